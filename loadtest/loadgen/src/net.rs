//! Opening subscriber sockets: optionally from a chosen loopback source address (bound
//! with `IP_BIND_ADDRESS_NO_PORT`, so the port is picked at connect time per 4-tuple and
//! each source address has its own ~28k ephemeral ports), and naming socket errors.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `dest`, from `source` when given. The socket gets `TCP_NODELAY` and
/// `SO_LINGER 0`: closing it at the end of a run sends a reset instead of leaving tens
/// of thousands of `TIME_WAIT` entries that would block the next run's ports.
pub async fn connect(dest: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = match dest {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        setsockopt(&sock, IpBindAddressNoPort, &true).map_err(io::Error::from)?;
        sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = sock.connect(dest).await?;
    stream.set_nodelay(true)?;
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    Ok(stream)
}

/// The source address of connection `i`: round-robin over `ips`, none (the kernel
/// chooses) when `ips` is empty.
pub fn source_for(ips: &[Ipv4Addr], i: usize) -> Option<Ipv4Addr> {
    (!ips.is_empty()).then(|| ips[i % ips.len()])
}

/// Short stable name of a socket error, for the error counts.
pub fn io_kind(e: &io::Error) -> String {
    use io::ErrorKind as K;
    match e.raw_os_error() {
        Some(24) => return "too_many_open_files".into(),
        Some(23) => return "system_file_table_full".into(),
        Some(99) => return "addr_not_available".into(),
        Some(11) => return "would_block_or_no_ports".into(),
        _ => {}
    }
    match e.kind() {
        K::ConnectionRefused => "refused".into(),
        K::ConnectionReset => "reset".into(),
        K::ConnectionAborted => "aborted".into(),
        K::AddrNotAvailable => "addr_not_available".into(),
        K::AddrInUse => "addr_in_use".into(),
        K::TimedOut => "timeout".into(),
        K::UnexpectedEof => "eof".into(),
        K::BrokenPipe => "broken_pipe".into(),
        other => format!("io_{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names() {
        assert_eq!(io_kind(&io::Error::from_raw_os_error(99)), "addr_not_available");
        assert_eq!(io_kind(&io::Error::from(io::ErrorKind::ConnectionRefused)), "refused");
        assert_eq!(io_kind(&io::Error::from_raw_os_error(24)), "too_many_open_files");
    }

    #[tokio::test]
    async fn binds_the_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let src = Ipv4Addr::new(127, 0, 0, 3);
        let (client, accepted) = tokio::join!(connect(dest, Some(src)), listener.accept());
        let client = client.unwrap();
        let (_server, peer) = accepted.unwrap();
        assert_eq!(client.local_addr().unwrap().ip(), IpAddr::V4(src));
        assert_eq!(peer.ip(), IpAddr::V4(src));
    }
}
