//! A TCP relay in front of etcd that a test can block: the agents lose
//! etcd while etcd itself keeps running, so their leases expire there, as
//! in a network partition between the database hosts and etcd (stopping
//! etcd instead keeps every lease: etcd renews them when it comes back).

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Relay {
    pub port: u16,
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to `target` (host:port).
    pub fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("non-blocking relay");
        let port = listener.local_addr().expect("relay address").port();
        let blocked = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (b, s, o) = (blocked.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) if b.load(Ordering::Relaxed) => drop(inbound),
                    Ok((inbound, _)) => {
                        let _ = relay(inbound, &target, &o);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Relay {
            port,
            blocked,
            stop,
            open,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn block(&self) {
        self.blocked.store(true, Ordering::Relaxed);
        for s in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.block();
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(inbound: TcpStream, target: &str, open: &Mutex<Vec<TcpStream>>) -> io::Result<()> {
    inbound.set_nonblocking(false)?;
    let outbound = TcpStream::connect(target)?;
    {
        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
        open.push(inbound.try_clone()?);
        open.push(outbound.try_clone()?);
    }
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
    };
    pipe(inbound.try_clone()?, outbound.try_clone()?);
    pipe(outbound, inbound);
    Ok(())
}
