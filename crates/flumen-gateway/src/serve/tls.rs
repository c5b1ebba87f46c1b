//! HTTPS for the gateway's HTTP listener (rustls).

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor for the PEM certificate chain and key at these paths.
pub(super) fn acceptor(cert: &str, key: &str) -> Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("server.tls_cert: cannot read {cert}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls_cert: {cert} is not a PEM certificate chain"))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("server.tls_key: {key} is not a PEM private key"))?;
    let config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server.tls_cert / server.tls_key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS before HTTP, for [`super::conn::serve`].
#[derive(Clone)]
pub(super) struct Tls(pub TlsAcceptor);

impl super::conn::Handshake for Tls {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

    const CLEAR: bool = false;

    async fn handshake(&self, tcp: tokio::net::TcpStream) -> std::io::Result<Self::Io> {
        self.0.accept(tcp).await
    }
}
