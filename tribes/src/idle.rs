//! How a pool thread (dispatch thread, receiver worker) waits for its next piece of work.
//!
//! Waking a sleeping thread is the most expensive step of a hand-off between threads: a
//! futex wake, a trip through the scheduler and, on a virtual machine, an interrupt between
//! cores that costs a VM exit. Under request/reply traffic such as session replication,
//! the next message for a thread that just ran out of work usually comes within tens of
//! microseconds. So before it sleeps, an idle thread looks at its queue again a bounded
//! number of times and gives up the core in between (`sched_yield`): while other threads
//! have work it only runs between their turns, and when the machine is idle the looking
//! costs cores nobody wanted. `crossbeam_channel`'s own `recv` already does this briefly
//! (about ten yields); this extends it.
//!
//! Measured on a 2-core machine with three replicating nodes and their client (issue #5's
//! benchmark, three alternating pairs against the plain channel wait): synchronous
//! replication 0.25–0.28× → 0.32–0.34× of one local-only node, read-your-writes 0.35–0.38×
//! → 0.41–0.45×, plain async 0.61–0.71× → 0.69–0.77×; a `USE_ACK | SYNCHRONIZED_ACK` round
//! trip between two channels fell from 0.9–1.1× to 0.4–0.5× of a raw TCP request/ACK, with
//! asynchronous bulk throughput unchanged. Letting every idle thread look (not one per
//! pool) helped replication a little more but cut bulk throughput of 1 KiB messages by up
//! to a third; sleeping at once, without even the channel's spin, made async replication
//! half again as expensive in CPU per request.

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, RecvError, TryRecvError};

/// The looking of one pool of threads: at most one of them looks at a time (the others go
/// to sleep), so a pool of idle threads cannot crowd out the busy ones of a loaded machine,
/// and the thread that finished last (most likely the one the next message concerns) is the
/// one looking.
#[derive(Debug)]
pub(crate) struct IdleWait {
    looks: u32,
    looking: AtomicBool,
}

impl IdleWait {
    /// Up to `looks` looks (0: sleep after the channel's own brief spin).
    pub(crate) fn new(looks: u32) -> Self {
        Self {
            looks,
            looking: AtomicBool::new(false),
        }
    }

    /// Takes the next item from `rx`, looking again up to `looks` times with a yield before
    /// each (if no other thread of the pool is looking), then blocking.
    pub(crate) fn recv<T>(&self, rx: &Receiver<T>) -> Result<T, RecvError> {
        if let Ok(item) = rx.try_recv() {
            return Ok(item);
        }
        if self.looks > 0
            && self
                .looking
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let mut found = Err(TryRecvError::Empty);
            for _ in 0..self.looks {
                std::thread::yield_now();
                found = rx.try_recv();
                if !matches!(found, Err(TryRecvError::Empty)) {
                    break;
                }
            }
            self.looking.store(false, Ordering::Release);
            match found {
                Ok(item) => return Ok(item),
                Err(TryRecvError::Disconnected) => return Err(RecvError),
                Err(TryRecvError::Empty) => {}
            }
        }
        rx.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn returns_queued_items_then_the_end() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        let (looking, sleeping) = (IdleWait::new(100), IdleWait::new(0));
        assert_eq!(looking.recv(&rx), Ok(1));
        assert_eq!(sleeping.recv(&rx), Ok(2));
        drop(tx);
        assert_eq!(looking.recv(&rx), Err(RecvError));
        assert_eq!(sleeping.recv(&rx), Err(RecvError));
    }

    #[test]
    fn an_item_sent_after_the_looks_still_wakes_the_thread() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || IdleWait::new(3).recv(&rx));
        // Long after three yields: the thread must be in the blocking recv by now.
        std::thread::sleep(Duration::from_millis(100));
        tx.send(7u8).unwrap();
        assert_eq!(t.join().unwrap(), Ok(7));
    }

    #[test]
    fn one_thread_of_a_pool_looks_the_others_sleep() {
        let (tx, rx) = crossbeam_channel::bounded(8);
        let wait = std::sync::Arc::new(IdleWait::new(u32::MAX));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (rx, wait) = (rx.clone(), std::sync::Arc::clone(&wait));
                std::thread::spawn(move || wait.recv(&rx))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // Exactly one thread holds the look (u32::MAX looks: it is still looking).
        assert!(wait.looking.load(Ordering::Acquire));
        for i in 0..3 {
            tx.send(i).unwrap();
        }
        let mut got: Vec<i32> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(!wait.looking.load(Ordering::Acquire));
    }
}
