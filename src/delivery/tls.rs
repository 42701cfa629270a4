//! The client side of STARTTLS for a route: rustls connectors (ring
//! provider) — one that verifies the next hop's certificate against the
//! system's roots or a configured CA (`tls = "required"`), one that only
//! encrypts (`opportunistic`, RFC 7435: a certificate that does not check
//! out is still better than plaintext).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;

use super::client::WantTls;
use crate::config::{Route, TlsPolicy};

/// A route's TLS settings, as delivery needs them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboundTls {
    /// none, opportunistic or required.
    pub policy: TlsPolicy,
    /// Authorities to verify against (None: the system's roots).
    pub ca: Option<PathBuf>,
    /// The name the certificate must carry (None: the hop's address).
    pub name: Option<String>,
}

impl OutboundTls {
    /// No TLS (a handover to a cluster VIP, a test).
    pub const NONE: OutboundTls = OutboundTls {
        policy: TlsPolicy::None,
        ca: None,
        name: None,
    };

    /// STARTTLS when offered, any certificate.
    pub const OPPORTUNISTIC: OutboundTls = OutboundTls {
        policy: TlsPolicy::Opportunistic,
        ca: None,
        name: None,
    };

    /// What `route` asks for.
    pub fn of(route: &Route) -> OutboundTls {
        OutboundTls {
            policy: route.tls,
            ca: route.tls_ca.clone(),
            name: route.tls_name.clone(),
        }
    }

    /// What the client machine should do.
    pub fn want(&self) -> WantTls {
        match self.policy {
            TlsPolicy::None => WantTls::No,
            TlsPolicy::Opportunistic => WantTls::IfOffered,
            TlsPolicy::Required => WantTls::Must,
        }
    }

    /// The name to verify (and to send as SNI) for `hop`.
    pub fn server_name(&self, hop: SocketAddr) -> Result<ServerName<'static>, String> {
        match &self.name {
            Some(n) => ServerName::try_from(n.clone()).map_err(|e| format!("tls_name {n:?}: {e}")),
            None => Ok(ServerName::IpAddress(hop.ip().into())),
        }
    }
}

/// How long a connector is used before its roots are read again (a
/// renewed CA file, updated system roots).
const REBUILD_AFTER: Duration = Duration::from_secs(600);

/// Connectors by the roots they verify against, rebuilt now and then.
#[derive(Default)]
pub struct Connectors {
    built: Mutex<HashMap<Roots, (Instant, TlsConnector)>>,
}

/// Which roots a connector verifies against: None, it does not verify;
/// Some(None), the system's; Some(Some(file)), a CA file's.
type Roots = Option<Option<PathBuf>>;

impl Connectors {
    /// The connector for `tls`: verifying for `required`, encrypting only
    /// otherwise. Err says why roots could not be loaded.
    pub fn get(&self, tls: &OutboundTls) -> Result<TlsConnector, String> {
        let key = (tls.policy == TlsPolicy::Required).then(|| tls.ca.clone());
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = built
            .get(&key)
            .filter(|(at, _)| at.elapsed() < REBUILD_AFTER)
        {
            return Ok(c.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match &key {
            Some(ca) => builder
                .with_root_certificates(roots(ca.as_ref())?)
                .with_no_client_auth(),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
        };
        let c = TlsConnector::from(Arc::new(config));
        built.insert(key, (crate::clock::instant(), c.clone()));
        Ok(c)
    }
}

/// The authorities in `ca`, or the system's.
fn roots(ca: Option<&PathBuf>) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{}: no usable CA certificate", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(
                    "no system CA certificates found (install ca-certificates, or set tls_ca)"
                        .into(),
                );
            }
        }
    }
    Ok(store)
}

/// Accepts any certificate but still checks the handshake signatures:
/// the session is encrypted against passive listeners, which is what
/// opportunistic TLS promises.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
