//! Open files per process: the most subscriber sockets one process may hold, and raising
//! the soft open-file limit to what a process needs.

/// Most subscriber sockets one process may open: the hard limit on open files here is
/// 20,000 per process, and the process needs a few more for itself.
pub const MAX_SUBSCRIBERS_PER_PROCESS: usize = 19_000;

/// Raises the soft open-file limit to the hard limit when it is below `need`.
pub fn raise_nofile(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        anyhow::ensure!(
            hard >= need,
            "this process needs {need} file descriptors but the hard limit is {hard}"
        );
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}
