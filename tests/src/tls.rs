//! TLS for tests: the committed test-only PKI (`tests/fixtures/tls/`, made by its `make.sh`)
//! and a TLS-terminating proxy, the reverse proxy of a deployment in miniature: the server's
//! HTTP shim is plain HTTP by design, and WebFinger reaches it over HTTPS through the proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The directory of the test PKI.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls")
}

/// The test CA's certificate (PEM): what a test trusts to reach a server of the test PKI.
pub fn ca_file() -> PathBuf {
    fixtures_dir().join("ca.pem")
}

/// The server certificate (PEM), signed by [`ca_file`], for `127.0.0.1`, `localhost`,
/// `a.localhost` and `b.localhost`.
pub fn server_cert_file() -> PathBuf {
    fixtures_dir().join("server.pem")
}

/// The server certificate's key (PEM).
pub fn server_key_file() -> PathBuf {
    fixtures_dir().join("server.key")
}

/// A nats-server config block that makes the broker speak TLS with the server certificate, to
/// append with [`crate::NatsServer::start_with`]. `allow_non_tls`: the in-process
/// kez-chat-servers' own connections (on loopback) stay plain, since async-nats trusts a
/// private CA for them only through `SSL_CERT_FILE`, which a test cannot set for itself alone
/// (server_resilience.rs checks that way); every connection that asks for TLS gets it.
pub fn nats_tls_conf() -> String {
    format!(
        "allow_non_tls: true\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n}}\n",
        server_cert_file().display().to_string(),
        server_key_file().display().to_string()
    )
}

/// A TLS-terminating TCP proxy on a loopback port: each connection's TLS is ended here with
/// the server certificate, and its bytes go to `target` and back. Stops when dropped.
pub struct TlsProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens on an OS-chosen loopback port now (so its address is known before `target`
    /// serves; connections meanwhile fail as a proxy to a down backend would) and forwards to
    /// `target`.
    ///
    /// # Panics
    ///
    /// If the fixture's certificate or key cannot be read, or no port can be bound.
    pub async fn start(target: SocketAddr) -> TlsProxy {
        let certs = CertificateDer::pem_file_iter(server_cert_file())
            .expect("the test server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("the test server certificate parses");
        let key = PrivateKeyDer::from_pem_file(server_key_file()).expect("the test server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the test certificate and key match");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the TLS proxy");
        let addr = listener.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A failed handshake (a client that does not trust the CA) just ends.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut backend) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Ends with a close_notify to the client once the backend is done.
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
                });
            }
        });
        TlsProxy { addr, task }
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its HTTPS base URL, `https://127.0.0.1:<port>`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
