//! The forwarder's threads: each runs a single-threaded tokio runtime of its own, and a
//! connection lives its whole life on one of them.
//!
//! Why not tokio's multi-threaded runtime: a relay is a ping-pong of small reads and writes,
//! and that scheduler hands woken tasks between threads (work stealing, waking an idle
//! thread to look for work). Each handover is a cross-CPU wakeup, which on a virtual machine
//! is an exit to the hypervisor. Measured on loopback with 64-byte request/response (2 vCPUs,
//! `benches/userspace_forward.py`), pinning each connection to a thread took the median
//! latency the forwarder adds from 110-120 us to 60-80 us, and its p99 from about 320 us to
//! 160-230 us. Listeners are spread over the threads; an accepted connection stays on the
//! thread that accepted it unless that one is busier than the others ([`Pool::place`]), so
//! one busy Service still uses every core.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The index of the worker this thread is, on worker threads.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Where tasks go: the workers' handles. Tasks may hold it; it keeps no thread alive.
pub struct Pool {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Connections on each worker.
    load: Vec<Arc<AtomicUsize>>,
}

/// A connection counted on its worker until this is dropped.
pub struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The worker for a new connection: this one, unless it holds more than one connection
    /// above the emptiest. Staying saves moving the socket to another poller and waking that
    /// worker's thread; a connection that is closing still counts for a moment, so without
    /// the slack a stream of short connections one at a time would bounce between threads.
    /// A burst of many is still spread evenly.
    pub fn place(&self) -> (usize, Load) {
        let here = Pool::current().unwrap_or(0);
        let held = |i: usize| self.load[i].load(Ordering::Relaxed);
        let emptiest = (0..self.load.len())
            .min_by_key(|&i| held(i))
            .unwrap_or(here);
        let best = if held(here) <= held(emptiest) + 1 {
            here
        } else {
            emptiest
        };
        let count = &self.load[best];
        count.fetch_add(1, Ordering::Relaxed);
        (best, Load(count.clone()))
    }

    /// The next worker in turn (for listeners).
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index]
    }

    /// The worker running the calling thread, if it is one.
    pub fn current() -> Option<usize> {
        CURRENT.with(Cell::get)
    }

    /// Run `task` on worker `index` (dropped unstarted once the workers have stopped).
    pub fn spawn<F>(&self, index: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[index].spawn(task);
    }
}

/// The threads themselves: dropping this stops them, and with them every task.
pub struct Workers {
    pool: Arc<Pool>,
    running: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Start `n` (at least one) threads named `name`.
    pub fn start(n: usize, name: &str) -> io::Result<Workers> {
        let mut handles = Vec::new();
        let mut running = Vec::new();
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    // Returns when the sender is sent to or dropped; dropping the runtime
                    // then drops every task on it, closing their sockets.
                    let _ = runtime.block_on(stopped);
                })?;
            running.push((stop, thread));
        }
        Ok(Workers {
            pool: Arc::new(Pool {
                load: handles.iter().map(|_| Arc::default()).collect(),
                handles,
                next: AtomicUsize::new(0),
            }),
            running,
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let (stops, threads): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.running).into_iter().unzip();
        drop(stops);
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn tasks_run_on_the_worker_named_and_turns_go_round() {
        let workers = Workers::start(3, "test-worker").unwrap();
        let pool = workers.pool();
        assert_eq!(
            (0..6).map(|_| pool.next()).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
        let (tx, rx) = mpsc::channel();
        for i in [2, 0, 1] {
            let tx = tx.clone();
            pool.spawn(i, async move {
                tx.send((i, Pool::current())).unwrap();
            });
        }
        let mut seen: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, [(0, Some(0)), (1, Some(1)), (2, Some(2))]);
        assert_eq!(Pool::current(), None);
    }

    #[test]
    fn connections_stay_on_their_worker_until_it_holds_two_more_than_the_emptiest() {
        let workers = Workers::start(3, "test-worker").unwrap();
        let pool = workers.pool().clone();
        // From outside the workers, "here" is the first one. A burst: within two of the
        // emptiest, connections stay; past that they go to the first of the emptiest.
        let mut held = Vec::new();
        let mut placed = Vec::new();
        for _ in 0..6 {
            let (i, load) = pool.place();
            placed.push(i);
            held.push(load);
        }
        assert_eq!(placed, [0, 0, 1, 2, 0, 1]);
        drop(held);
        // One at a time, with the last one still closing: they all stay.
        let mut closing = pool.place();
        for _ in 0..5 {
            let next = pool.place();
            assert_eq!(next.0, 0);
            closing = next;
        }
        drop(closing);
        // On another worker, "here" is that one.
        let (tx, rx) = mpsc::channel();
        let inner = pool.clone();
        pool.spawn(2, async move {
            tx.send(inner.place().0).unwrap();
        });
        assert_eq!(rx.recv().unwrap(), 2);
    }

    #[test]
    fn dropping_the_workers_ends_their_tasks() {
        let workers = Workers::start(2, "test-worker").unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        let pool = workers.pool().clone();
        let (started, running) = mpsc::channel::<()>();
        pool.spawn(1, async move {
            let _held = tx;
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        });
        running.recv().unwrap();
        drop(workers);
        // The task was dropped with its runtime, and the sender it held with it.
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
        // A pool outliving its workers drops what it is given instead of running it.
        let (tx, rx) = mpsc::channel::<()>();
        pool.spawn(0, async move {
            tx.send(()).unwrap();
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
