//! A connection's pending bytes: the ciphertext of an incomplete TLS record
//! (`tls_in`) and encrypted output the socket has not taken yet (`tls_out`).
//!
//! With the unsent output goes an estimate of how much of it answers
//! requests (the slow-consumer rule lets answers exceed the limit, not
//! events; `session.rs`).
//!
//! Both are empty on an idle connection, so they live behind one optional
//! box: 8 bytes in every connection slot instead of 40 (a boxed slice and a
//! Vec inline), and no allocation at all once both have drained. A
//! connection with something pending pays one 48-byte box on top of the
//! bytes themselves.

#[derive(Debug, Default)]
pub(super) struct PendingIo(Option<Box<Buffers>>);

#[derive(Debug, Default)]
struct Buffers {
    /// Replaced whole, never grown: a boxed slice.
    tls_in: Box<[u8]>,
    tls_out: Vec<u8>,
    /// Bytes of `tls_out` that answer requests, at most: bytes leaving are
    /// taken off it first, so the events' share is never underestimated.
    answers: usize,
}

impl PendingIo {
    /// The held part of an incomplete TLS record (empty if none).
    pub(super) fn tls_in(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b.tls_in)
    }

    /// The same, for rustls to look at in place.
    pub(super) fn tls_in_mut(&mut self) -> &mut [u8] {
        match self.0.as_deref_mut() {
            Some(b) => &mut b.tls_in,
            None => &mut [],
        }
    }

    /// Replaces the held partial record (`&[]`: drops it).
    pub(super) fn set_tls_in(&mut self, bytes: &[u8]) {
        if bytes.is_empty() && self.0.is_none() {
            return;
        }
        self.0.get_or_insert_default().tls_in = bytes.into();
        self.release_if_empty();
    }

    /// Unsent output.
    pub(super) fn tls_out(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b.tls_out)
    }

    pub(super) fn out_len(&self) -> usize {
        self.tls_out().len()
    }

    /// Queues output behind what is unsent.
    #[cfg(test)]
    pub(super) fn push_out(&mut self, bytes: &[u8]) {
        self.push_out_answering(bytes, 0);
    }

    /// Queues output of which `answers` bytes answer requests.
    pub(super) fn push_out_answering(&mut self, bytes: &[u8], answers: usize) {
        if !bytes.is_empty() {
            let b = self.0.get_or_insert_default();
            b.tls_out.extend_from_slice(bytes);
            b.answers = (b.answers + answers).min(b.tls_out.len());
        }
    }

    /// Of the unsent output, how much answers requests (an estimate that
    /// errs low).
    pub(super) fn answers(&self) -> usize {
        self.0.as_deref().map_or(0, |b| b.answers)
    }

    /// The socket took the first `n` unsent bytes.
    pub(super) fn consume_out(&mut self, n: usize) {
        let Some(b) = self.0.as_deref_mut() else {
            return;
        };
        b.answers = b.answers.saturating_sub(n);
        if n >= b.tls_out.len() {
            // Freed, not cleared: a drained buffer must not stay allocated
            // at its high-water mark on a connection that goes idle.
            b.tls_out = Vec::new();
            self.release_if_empty();
        } else if n > 0 {
            b.tls_out.drain(..n);
        }
    }

    fn release_if_empty(&mut self) {
        if self
            .0
            .as_deref()
            .is_some_and(|b| b.tls_in.is_empty() && b.tls_out.is_empty())
        {
            self.0 = None;
        }
    }

    /// Heap bytes held (requested from the allocator); 0 when idle.
    #[cfg(test)]
    pub(super) fn heap_bytes(&self) -> usize {
        self.0.as_deref().map_or(0, |b| {
            std::mem::size_of::<Buffers>() + b.tls_in.len() + b.tls_out.capacity()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_holds_no_buffer() {
        let mut p = PendingIo::default();
        assert_eq!(p.heap_bytes(), 0);
        assert_eq!(std::mem::size_of::<PendingIo>(), 8);

        // A partial record arrives, then completes.
        p.set_tls_in(&[1, 2, 3]);
        assert_eq!(p.tls_in(), &[1, 2, 3]);
        p.tls_in_mut()[0] = 9;
        assert_eq!(p.tls_in(), &[9, 2, 3]);
        p.set_tls_in(&[]);
        assert_eq!(p.heap_bytes(), 0, "partial record released");

        // The socket refuses 64 KiB; it leaves in two writes.
        p.push_out(&vec![7u8; 65536]);
        p.push_out(&[8u8; 10]);
        assert_eq!(p.out_len(), 65546);
        p.consume_out(65536);
        assert_eq!(p.tls_out(), &[8u8; 10]);
        assert!(p.heap_bytes() > 0);
        p.consume_out(10);
        assert_eq!(p.out_len(), 0);
        assert_eq!(p.heap_bytes(), 0, "drained output released");
    }

    #[test]
    fn leaving_bytes_count_as_answers_first() {
        let mut p = PendingIo::default();
        p.push_out(&[0; 100]);
        p.push_out_answering(&[0; 1000], 900);
        assert_eq!(p.answers(), 900);
        p.consume_out(300);
        assert_eq!(p.answers(), 600, "may have been events: assume answers");
        p.push_out_answering(&[0; 10], 10_000);
        assert_eq!(p.answers(), 810, "never more than is queued");
        p.consume_out(810);
        assert_eq!((p.out_len(), p.answers()), (0, 0));
    }

    #[test]
    fn either_buffer_keeps_the_other() {
        let mut p = PendingIo::default();
        p.set_tls_in(&[1]);
        p.push_out(&[2, 3]);
        p.consume_out(2);
        assert_eq!(p.tls_in(), &[1], "output drained, partial record kept");
        let held = std::mem::size_of::<Buffers>() + 1;
        assert_eq!(p.heap_bytes(), held, "the drained output's memory is freed");
        p.push_out(&[4]);
        p.set_tls_in(&[]);
        assert_eq!(p.tls_out(), &[4], "record done, output kept");
        p.consume_out(1);
        assert_eq!(p.heap_bytes(), 0);
        // Nothing pending: no-ops allocate nothing.
        p.push_out(&[]);
        p.set_tls_in(&[]);
        p.consume_out(0);
        assert_eq!(p.heap_bytes(), 0);
    }
}
