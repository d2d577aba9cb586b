//! Reading a WebSocket client: the next whole message from the socket, through the
//! frame decoder, with the read buffer on the stack only for the call.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};
use tracing::debug;

use super::reply::End;
use crate::wire::ws_frame::{DecodeError, Decoder, Incoming};

/// Bytes read from the socket per call, on the stack.
const READ_CHUNK: usize = 4096;

/// Polls for the client's next message; `Err` ends the session.
pub(super) fn poll_client<S: AsyncRead + Unpin>(
    io: &mut S,
    decoder: &mut Decoder,
    cx: &mut Context<'_>,
) -> Poll<Result<Incoming, End>> {
    loop {
        match decoder.decode() {
            Ok(Some(m)) => return Poll::Ready(Ok(m)),
            Ok(None) => {}
            Err(DecodeError::TooBig) => return Poll::Ready(Err(End::TooBig)),
            Err(DecodeError::Protocol(why)) => {
                debug!(why, "websocket protocol error");
                return Poll::Ready(Err(End::Protocol));
            }
            Err(DecodeError::InvalidData(why)) => {
                debug!(why, "websocket protocol error");
                return Poll::Ready(Err(End::InvalidData));
            }
        }
        // The read buffer lives on the stack, only for this call.
        // Uninitialized: most polls find nothing to read, and zeroing 4 KiB per wake-up
        // showed in profiles.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => decoder.feed(buf.filled()),
            Poll::Ready(_) => return Poll::Ready(Err(End::ClientGone)),
        }
    }
}
