//! Test helpers: server frames built by hand, client frames read back, and a fake
//! server that answers the upgrade.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::http::header;

/// An unmasked server frame.
pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => v.push(n as u8),
        n if n <= 0xffff => {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(payload);
    v
}

/// Unmasks the client frames in `bytes`: (opcode, payload) each.
pub(crate) fn client_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(bytes[0] & 0xf0, 0x80, "FIN, no reserved bits");
        assert_eq!(bytes[1] & 0x80, 0x80, "client frames are masked");
        let len = (bytes[1] & 0x7f) as usize;
        assert!(len <= 125);
        let mask = &bytes[2..6];
        let payload = bytes[6..6 + len].iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m).collect();
        out.push((bytes[0] & 0x0f, payload));
        bytes = &bytes[6 + len..];
    }
    out
}

/// A fake server: answers the upgrade with `answer(key)`, then sends `after`.
pub(crate) async fn fake_server(
    answer: impl FnOnce(&str) -> String + Send + 'static,
    after: Vec<u8>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<(String, TcpStream)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(accept(listener, answer, after)))
}

/// Accepts one connection, reads its upgrade request, and answers `answer(key)`
/// followed by `after` in the same write; returns the request and the socket.
pub(crate) async fn accept(
    listener: tokio::net::TcpListener,
    answer: impl FnOnce(&str) -> String,
    after: Vec<u8>,
) -> (String, TcpStream) {
    let (mut sock, _) = listener.accept().await.unwrap();
    let mut req = Vec::new();
    while !req.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(sock.read(&mut b).await.unwrap(), 1);
        req.push(b[0]);
    }
    let req = String::from_utf8(req).unwrap();
    let key = header(req.as_bytes(), "sec-websocket-key").unwrap().to_owned();
    let mut out = answer(&key).into_bytes();
    out.extend(after);
    sock.write_all(&out).await.unwrap();
    (req, sock)
}

/// A `101` answer to the upgrade with key `key`.
pub(crate) fn switching(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}
