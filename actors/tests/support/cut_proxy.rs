//! A TCP proxy on 127.0.0.1 that can lose one answer: armed with a marker,
//! it forwards the client's bytes that hold the marker to the server, then
//! drops the server's next answer on that connection and closes it. The
//! server has done the work; the client sees a broken connection and never
//! learns the outcome (an ambiguous commit). It can also refuse every new
//! connection after the cut, as a server that went away would, and close
//! every open connection at once, as a server that restarted does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Shared {
    marker: Option<Vec<u8>>,
    cut: usize,
    /// Refuse connections after the next cut.
    refuse_after: bool,
    refusing: bool,
}

pub struct CutProxy {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    /// Bumped to close every open connection.
    closing: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        let (closing, closed) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if state.lock().unwrap().refusing {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, state.clone(), closed.clone()));
            }
        });
        CutProxy {
            addr,
            shared,
            closing,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next client bytes that hold `marker` get through; the answer to
    /// them does not, and their connection is closed.
    pub fn arm(&self, marker: &[u8]) {
        self.shared.lock().unwrap().marker = Some(marker.to_vec());
    }

    /// As [`CutProxy::arm`], and from the cut on every new connection is
    /// closed at once, until [`CutProxy::allow`].
    pub fn arm_then_refuse(&self, marker: &[u8]) {
        let mut s = self.shared.lock().unwrap();
        s.marker = Some(marker.to_vec());
        s.refuse_after = true;
    }

    /// Takes new connections again.
    pub fn allow(&self) {
        let mut s = self.shared.lock().unwrap();
        s.refusing = false;
        s.refuse_after = false;
    }

    /// Closes every open connection; new ones are taken as before.
    pub fn close_all(&self) {
        self.closing.send_modify(|n| *n += 1);
    }

    /// How many answers were dropped.
    pub fn cut(&self) -> usize {
        self.shared.lock().unwrap().cut
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    shared: Arc<Mutex<Shared>>,
    mut closed: tokio::sync::watch::Receiver<u64>,
) {
    closed.mark_unchanged();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set when this connection's client sent the marker.
    let doomed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = {
        let doomed = doomed.clone();
        let shared = shared.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                {
                    let mut s = shared.lock().unwrap();
                    let hit = s
                        .marker
                        .as_ref()
                        .is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m.as_slice()));
                    if hit {
                        s.marker = None;
                        doomed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if doomed.load(std::sync::atomic::Ordering::SeqCst) {
                let mut s = shared.lock().unwrap();
                s.cut += 1;
                s.refusing = s.refuse_after;
                return;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first ends the connection: both halves drop.
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = closed.changed() => {}
    }
}
