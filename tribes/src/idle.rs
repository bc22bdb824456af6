//! How a pool thread (dispatch thread, receiver worker) waits for its next piece of work.
//!
//! Waking a sleeping thread is the most expensive step of a hand-off between threads: a
//! futex wake, a trip through the scheduler and, on a virtual machine, an interrupt between
//! cores that costs a VM exit. Under request/reply traffic such as session replication,
//! the next message for a thread that just ran out of work usually comes within tens of
//! microseconds. So before it sleeps, one idle thread of a pool looks at its queue again a
//! bounded number of times and gives up the core in between (`sched_yield`: any other
//! runnable thread on that core goes first, though the looker still competes for it). The
//! bound is a count, not a time: on an idle machine 100 looks take some tens of
//! microseconds, on a loaded one each can last another thread's time slice, which is when
//! looking saves the most. `crossbeam_channel`'s own `recv` already spins briefly and
//! yields a few times before it parks; this extends that for one thread per pool.
//!
//! Where a pool shares one queue (receiver workers), a send still wakes a worker that
//! sleeps in the channel's `recv` while another one looks; that worker usually finds the
//! queue empty again. A queue whose sleepers a producer wakes only when nobody is looking
//! was built and measured (three alternating pairs): no better, async replication a little
//! worse, apparently because the sleepers' own brief spin in the channel acted as more
//! looking. More looking helps this traffic; the limit of one looker protects bulk traffic.
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

/// The looking of one pool of threads: at most one of them looks at a time, the first to run
/// out of work while nobody is looking (the others go to sleep), so a pool of idle threads
/// cannot crowd out the busy ones of a loaded machine.
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
        if let Some(_looking) = Looking::take(&self.looking, self.looks) {
            for _ in 0..self.looks {
                std::thread::yield_now();
                match rx.try_recv() {
                    Ok(item) => return Ok(item),
                    Err(TryRecvError::Disconnected) => return Err(RecvError),
                    Err(TryRecvError::Empty) => {}
                }
            }
        }
        rx.recv()
    }
}

/// The right to look, held by one thread and given back when dropped, so no path out of the
/// look (nor a panic) can leave the pool without a looker.
struct Looking<'a>(&'a AtomicBool);

impl<'a> Looking<'a> {
    fn take(flag: &'a AtomicBool, looks: u32) -> Option<Self> {
        let free = looks > 0
            && flag
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
        // Not `then_some`: that would build, and drop, a `Looking` (clearing the flag) even
        // when another thread holds the look.
        free.then(|| Looking(flag))
    }
}

impl Drop for Looking<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
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
    fn an_item_sent_long_after_the_looks_still_wakes_the_thread() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || IdleWait::new(3).recv(&rx));
        // Three yields take microseconds; by now the thread has most likely given up looking
        // and sleeps in the channel (if the machine is slow, it is still looking: either way
        // the item must arrive).
        std::thread::sleep(Duration::from_millis(100));
        tx.send(7u8).unwrap();
        assert_eq!(t.join().unwrap(), Ok(7));
    }

    #[test]
    fn a_thread_finding_the_look_taken_sleeps_without_touching_it() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let wait = std::sync::Arc::new(IdleWait::new(u32::MAX));
        // Another thread of the pool holds the look (u32::MAX looks: a taker would never
        // stop looking on its own, so only the channel's wake can end this recv).
        let held = Looking::take(&wait.looking, 1).unwrap();
        let w = std::sync::Arc::clone(&wait);
        let t = std::thread::spawn(move || w.recv(&rx));
        std::thread::sleep(Duration::from_millis(50));
        tx.send(7u8).unwrap();
        assert_eq!(t.join().unwrap(), Ok(7));
        // It neither took nor cleared the look.
        assert!(wait.looking.load(Ordering::Acquire));
        drop(held);
        assert!(!wait.looking.load(Ordering::Acquire));
        // Free again: the next idle thread takes it, and gives it back when done.
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(8u8).unwrap();
        drop(tx);
        let w = IdleWait::new(5);
        assert_eq!(w.recv(&rx), Ok(8));
        assert_eq!(w.recv(&rx), Err(RecvError));
        assert!(!w.looking.load(Ordering::Acquire));
    }
}
