//! Open files: a node holds one descriptor per client, and the usual default soft limit
//! (1,024) would cap it at about a thousand. The node raises its soft limit to the hard
//! one at start, as loadgen does, so only the hard limit (`ulimit -Hn`, compose's
//! `nofile`, systemd's `LimitNOFILE`) needs setting.

/// Raises the soft open-file limit to the hard limit. Returns the limit in force.
pub fn raise_nofile() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Ok(hard),
        // An unlimited hard limit cannot be the soft one (the kernel caps it at
        // fs.nr_open): keep what there is.
        Err(_) => Ok(soft),
    }
}
