//! Driving rustls' unbuffered server connection over caller-owned buffers.
//!
//! The connection keeps no TLS buffers of its own: ciphertext is read into a
//! per-core scratch buffer, decrypted in place, and application data goes
//! straight into the connection's frame decoder. Output (handshake records,
//! alerts, encrypted frames) is appended to a `Vec` the caller chooses.

use palaver_protocol::{pb, DecodeError, FrameDecoder};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};

/// Where decrypted application data goes.
pub struct AppSink<'a> {
    pub decoder: &'a mut FrameDecoder,
    pub frames: &'a mut Vec<pb::Frame>,
    /// Set on the first decode failure; later data is dropped.
    pub error: &'a mut Option<DecodeError>,
}

impl AppSink<'_> {
    fn push(&mut self, payload: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let frames = &mut *self.frames;
        if let Err(e) = self.decoder.decode(payload, |f| frames.push(f)) {
            *self.error = Some(e);
        }
    }
}

/// What one [`drive`] call did.
#[derive(Debug, Default)]
pub struct Driven {
    /// Bytes at the front of the input that are done with (drop them).
    pub consumed: usize,
    /// The peer sent close_notify.
    pub peer_closed: bool,
    /// Both sides closed.
    pub closed: bool,
    /// `to_send` was encrypted into the output.
    pub sent: bool,
    /// A fatal TLS error (any alert for it is already in the output).
    pub error: Option<rustls::Error>,
}

/// Runs the connection over `input` until it needs more bytes: handshake
/// records and alerts are appended to `out`, application data is decoded into
/// `app`, and `to_send` (if not empty) is encrypted into `out` as soon as the
/// connection may send application data.
pub fn drive(
    tls: &mut UnbufferedServerConnection,
    input: &mut [u8],
    out: &mut Vec<u8>,
    mut app: Option<&mut AppSink<'_>>,
    to_send: &[u8],
) -> Driven {
    let mut done = Driven {
        sent: to_send.is_empty(),
        ..Driven::default()
    };
    loop {
        let UnbufferedStatus { mut discard, state } =
            tls.process_tls_records(&mut input[done.consumed..]);
        let mut stop = false;
        match state {
            Err(e) => {
                done.consumed += discard;
                done.error = Some(e);
                flush_alerts(tls, &mut input[done.consumed..], out);
                return done;
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            if let Some(app) = app.as_deref_mut() {
                                app.push(record.payload);
                            }
                        }
                        Err(e) => {
                            done.consumed += discard;
                            done.error = Some(e);
                            flush_alerts(tls, &mut input[done.consumed..], out);
                            return done;
                        }
                    }
                }
            }
            Ok(ConnectionState::ReadEarlyData(mut early)) => {
                // max_early_data_size is 0, so this does not happen; drain it anyway.
                while let Some(record) = early.next_record() {
                    match record {
                        Ok(record) => discard += record.discard,
                        Err(_) => break,
                    }
                }
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(&mut encode, out),
            Ok(ConnectionState::TransmitTlsData(mut transmit)) => {
                if !done.sent {
                    if let Some(mut write) = transmit.may_encrypt_app_data() {
                        done.sent = encrypt_into(&mut write, to_send, out);
                    }
                }
                // The bytes are in `out`, which the caller writes in order.
                transmit.done();
            }
            Ok(ConnectionState::BlockedHandshake) => stop = true,
            Ok(ConnectionState::WriteTraffic(mut write)) => {
                if !done.sent {
                    done.sent = encrypt_into(&mut write, to_send, out);
                }
                stop = true;
            }
            Ok(ConnectionState::PeerClosed) => done.peer_closed = true,
            Ok(ConnectionState::Closed) => {
                done.closed = true;
                stop = true;
            }
            Ok(_) => stop = true,
        }
        done.consumed += discard;
        if stop {
            return done;
        }
    }
}

/// Encrypts a close_notify alert into `out` (when the connection can still send).
pub fn close_notify(tls: &mut UnbufferedServerConnection, input: &mut [u8], out: &mut Vec<u8>) {
    let UnbufferedStatus { state, .. } = tls.process_tls_records(input);
    if let Ok(ConnectionState::WriteTraffic(mut write)) = state {
        let start = out.len();
        out.resize(start + 64, 0);
        match write.queue_close_notify(&mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(_) => out.truncate(start),
        }
    }
}

/// After an error rustls may have queued records ending in a fatal alert:
/// encode them all, in order. An error found while writing the server's
/// first flight (e.g. no common ALPN protocol) leaves ServerHello and the
/// compatibility ChangeCipherSpec queued before the alert, which is
/// encrypted under the handshake keys: without the ServerHello the client
/// cannot read it. rustls hands out queued records before it looks at input
/// again, and once they are out it only repeats the stored error (it never
/// alerts twice), so calling until it stops asking to encode is safe.
fn flush_alerts(tls: &mut UnbufferedServerConnection, input: &mut [u8], out: &mut Vec<u8>) {
    // ServerHello, ChangeCipherSpec, alert; the bound only guards the loop.
    for _ in 0..8 {
        let UnbufferedStatus { state, .. } = tls.process_tls_records(input);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(&mut encode, out),
            _ => return,
        }
    }
}

fn encode_into(
    encode: &mut rustls::unbuffered::EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    let mut need = 1024;
    loop {
        out.resize(start + need, 0);
        match encode.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(e)) => need = e.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return;
            }
        }
    }
}

/// Encrypts `data` into `out`; false if the keys are exhausted.
pub fn encrypt_into(
    write: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    // Record overhead in TLS 1.3: 5 header + 1 type + 16 tag per 16 KiB record.
    let mut need = data.len() + (data.len() / 16384 + 1) * 22;
    loop {
        out.resize(start + need, 0);
        match write.encrypt(data, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return true;
            }
            Err(EncryptError::InsufficientSize(e)) => need = e.required_size,
            Err(_) => {
                out.truncate(start);
                return false;
            }
        }
    }
}
