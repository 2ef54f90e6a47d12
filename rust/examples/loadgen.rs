//! A small native load generator and its servers, for benches/userspace_forward.py: latency
//! measured by a Python client is mostly the interpreter's own jitter.
//!
//! ```text
//! loadgen serve SECONDS            echo and one-byte servers on 127.0.0.1; prints their ports
//! loadgen rr ADDR CONNS RATE SECONDS   request/response on CONNS open connections, RATE
//!                                      requests/s in all: latency percentiles (JSON)
//! loadgen crr ADDR SECONDS         sequential connect, read one byte, close: rate and latency
//! ```
//!
//! Standard library only, a thread per connection, every loop bounded by its deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MESSAGE: usize = 64;

fn usage() -> ! {
    eprintln!("usage: loadgen serve SECONDS | rr ADDR CONNS RATE SECONDS | crr ADDR SECONDS");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e6
}

fn serve(seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
    let byte = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!(
        "{{\"echo\": {}, \"conn\": {}}}",
        echo.local_addr().expect("addr").port(),
        byte.local_addr().expect("addr").port()
    );
    let _ = std::io::stdout().flush();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        for s in byte.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.write_all(b"x");
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
}

/// One connection's paced request/response loop, sending at `first`, then every `interval`:
/// the round-trip time of each request.
fn rr_connection(
    addr: SocketAddr,
    first: Instant,
    interval: Duration,
    until: Instant,
) -> (Vec<Duration>, u64) {
    let mut times = Vec::new();
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (times, 1);
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let msg = [7u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let mut next = first;
    while next < until {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let t = Instant::now();
        if s.write_all(&msg).is_err() || s.read_exact(&mut back).is_err() {
            return (times, 1);
        }
        times.push(t.elapsed());
        next += interval;
    }
    (times, 0)
}

fn rr(addr: SocketAddr, conns: u32, rate: f64, seconds: f64) {
    // Connection i sends i/conns of an interval after connection 0, so requests arrive evenly
    // at `rate`. Started in step, the connections would send in bursts of `conns` at once,
    // and the slowest of each burst would measure queueing behind the others, not the path.
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + Duration::from_secs_f64(seconds);
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let first = start + interval * i / conns;
            std::thread::spawn(move || rr_connection(addr, first, interval, until))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (times, e) = w.join().unwrap_or((Vec::new(), 1));
        all.extend(times);
        errors += e;
    }
    all.sort();
    println!(
        "{{\"requests\": {}, \"errors\": {errors}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}}}",
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999)
    );
}

fn crr(addr: SocketAddr, seconds: f64) {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let mut times = Vec::new();
    let mut errors = 0u64;
    let mut byte = [0u8; 1];
    while Instant::now() < until && times.len() < 1_000_000 {
        let t = Instant::now();
        let ok = TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.read_exact(&mut byte)
        });
        match ok {
            Ok(()) => times.push(t.elapsed()),
            Err(_) => errors += 1,
        }
    }
    let rate = times.len() as f64 / start.elapsed().as_secs_f64();
    times.sort();
    println!(
        "{{\"connections\": {}, \"errors\": {errors}, \"per_second\": {rate:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}}}",
        times.len(),
        percentile(&times, 0.50),
        percentile(&times, 0.99)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(arg(&args, 2)),
        Some("rr") => rr(arg(&args, 2), arg(&args, 3), arg(&args, 4), arg(&args, 5)),
        Some("crr") => crr(arg(&args, 2), arg(&args, 3)),
        _ => usage(),
    }
}
