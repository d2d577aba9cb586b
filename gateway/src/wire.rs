//! Wire encoders at the bottom of the house: pure functions over bytes that know
//! nothing of the hub, sockets or requests. [`ws_frame`] is the WebSocket frame codec,
//! [`chunk`] the HTTP/1.1 chunked framing; SSE framing lives in [`shared::sse`], where
//! clients and load tools share it.

pub mod chunk;
pub mod ws_frame;
