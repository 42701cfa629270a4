//! The server side of STARTTLS: a rustls acceptor (ring provider) from the
//! PEM files `[smtp.tls]` names. Built at start and at every reload, so a
//! renewed certificate is picked up by `systemctl reload`.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::InboundTls;

/// An acceptor for the configured certificate, or why there is none
/// (naming the file).
pub fn acceptor(t: &InboundTls) -> Result<TlsAcceptor, String> {
    let cert_err = |e: &dyn std::fmt::Display| format!("{}: {e}", t.cert.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .map_err(|e| cert_err(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(&e))?;
    if certs.is_empty() {
        return Err(cert_err(&"no certificate in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_file(&t.key).map_err(|e| format!("{}: {e}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", t.cert.display(), t.key.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
