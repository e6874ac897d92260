//! Identities and pinned-key authentication.
//!
//! Each host has one ECDSA P-256 key (made by `keygen`, stored as a PKCS#8 PEM file, mode
//! 0600). Its **fingerprint** is the lowercase hex BLAKE3 of the DER `SubjectPublicKeyInfo`:
//! stable across restarts because a fresh self-signed certificate is minted from the key at
//! every start, and only the key is pinned. There is no CA and no trust on first use: the
//! sender names the receiver's fingerprint (`--peer`), the receiver lists allowed senders in an
//! allow-list file. Both checks run inside the TLS 1.3 handshake (custom rustls verifiers), so
//! an unknown peer is refused before a single application byte is read, let alone staged.
//! The handshake signature is still verified against the certificate's key, so presenting
//! somebody else's certificate without their private key fails.
//!
//! A running receiver checks a [`LiveAllowList`]: `shardrecv` replaces its list on SIGHUP,
//! and each handshake reads the list as it is then. Connections already made keep going:
//! removing a key refuses that sender's next connection, not its transfer in flight.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::Error;
use crate::wire::ALPN;

/// A 32-byte public-key fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER certificate: BLAKE3 of its SubjectPublicKeyInfo.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| rustls::Error::General(format!("unparseable peer certificate: {e}")))?;
        let spki = ee.subject_public_key_info();
        Ok(Fingerprint(*blake3::hash(spki.as_ref()).as_bytes()))
    }

    /// Parses 64 hex digits (an optional `b3:` prefix and surrounding space are ignored).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let t = text.trim();
        let t = t.strip_prefix("b3:").unwrap_or(t);
        let bad = || {
            Error::Input(format!(
                "invalid fingerprint {text:?}: expected 64 hex digits"
            ))
        };
        if t.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(t.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A loaded identity: private key plus a certificate minted from it.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    /// DER `SubjectPublicKeyInfo`: the fingerprint is BLAKE3 of these bytes.
    spki: Vec<u8>,
    pub fingerprint: Fingerprint,
}

impl Identity {
    /// Generates a new key and writes it to `path` (mode 0600); refuses to overwrite.
    pub fn generate(path: &Path) -> Result<Identity, Error> {
        let key = rcgen::KeyPair::generate()
            .map_err(|e| Error::Identity(format!("cannot generate a key: {e}")))?;
        let pem = key.serialize_pem();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::Input(format!(
                        "{} already exists; refusing to overwrite an identity",
                        path.display()
                    ))
                } else {
                    Error::io(path, e)
                }
            })?;
        f.write_all(pem.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path, e))?;
        Identity::from_key(key)
    }

    /// Loads a key file written by [`Identity::generate`].
    pub fn load(path: &Path) -> Result<Identity, Error> {
        let pem = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| {
            Error::Identity(format!(
                "{} is not a valid identity key: {e}",
                path.display()
            ))
        })?;
        Identity::from_key(key)
    }

    fn from_key(key: rcgen::KeyPair) -> Result<Identity, Error> {
        let params = rcgen::CertificateParams::new(vec!["shardxfer".to_string()])
            .map_err(|e| Error::Identity(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::Identity(format!("cannot mint a certificate: {e}")))?;
        let cert = cert.der().clone();
        let fingerprint = Fingerprint::of_certificate(&cert)
            .map_err(|e| Error::Identity(format!("minted an unreadable certificate: {e}")))?;
        use rcgen::PublicKeyData;
        Ok(Identity {
            cert,
            key_der: key.serialize_der(),
            spki: key.subject_public_key_info(),
            fingerprint,
        })
    }

    /// The public key as DER `SubjectPublicKeyInfo` (BLAKE3 of it is [`Identity::fingerprint`]).
    pub fn public_key_info(&self) -> &[u8] {
        &self.spki
    }

    /// Signs `message` with this key (ECDSA P-256 with SHA-256, ASN.1 signature): how the
    /// orchestrator signs transfer tickets ([`crate::ticket`]).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        use rcgen::SigningKey;
        let key = rcgen::KeyPair::try_from(self.key_der.as_slice())
            .map_err(|e| Error::Identity(format!("cannot reload the key: {e}")))?;
        key.sign(message)
            .map_err(|e| Error::Identity(format!("cannot sign: {e}")))
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Fingerprints allowed to connect to a receiver, read from a file: one per line,
/// `#` starts a comment (the rest of the line is ignored, so `FP  # host-a` works).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    allowed: HashSet<Fingerprint>,
    pub source: PathBuf,
}

impl AllowList {
    pub fn load(path: &Path) -> Result<AllowList, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut allowed = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fp = Fingerprint::parse(content).map_err(|_| {
                Error::Input(format!(
                    "{}:{}: invalid fingerprint {content:?} (expected 64 hex digits)",
                    path.display(),
                    n + 1
                ))
            })?;
            allowed.insert(fp);
        }
        Ok(AllowList {
            allowed,
            source: path.to_path_buf(),
        })
    }

    pub fn from_fingerprints(fps: impl IntoIterator<Item = Fingerprint>) -> AllowList {
        AllowList {
            allowed: fps.into_iter().collect(),
            source: PathBuf::new(),
        }
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.allowed.contains(fp)
    }

    pub fn len(&self) -> usize {
        self.allowed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }
}

/// The allow-list of a running receiver: replaceable while it serves (SIGHUP), read by
/// every handshake; counts the senders it refused.
#[derive(Debug, Default)]
pub struct LiveAllowList {
    current: RwLock<Arc<AllowList>>,
    refusals: AtomicU64,
}

impl LiveAllowList {
    pub fn new(list: AllowList) -> Self {
        LiveAllowList {
            current: RwLock::new(Arc::new(list)),
            refusals: AtomicU64::new(0),
        }
    }

    /// The list handshakes check from now on; returns the one it replaces.
    pub fn replace(&self, list: AllowList) -> Arc<AllowList> {
        let new = Arc::new(list);
        match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, new),
            // A panicked writer left nothing half-done (one pointer swap): take it over.
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    pub fn current(&self) -> Arc<AllowList> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.current().contains(fp)
    }

    /// Senders refused in the handshake since the start.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Handshake signature checks shared by both verifiers: pinning decides *which* key is
/// acceptable, these prove the peer holds its private key.
#[derive(Debug)]
struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    fn tls12(
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

    fn tls13(
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

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies the receiver's certificate by its pinned key fingerprint.
#[derive(Debug)]
struct PinnedServerVerifier {
    expected: Fingerprint,
    signatures: Signatures,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of_certificate(end_entity)?;
        if got == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "receiver key fingerprint {got} is not the pinned {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Verifies a sender's certificate against the allow-list.
#[derive(Debug)]
struct AllowListClientVerifier {
    allow: Arc<LiveAllowList>,
    signatures: Signatures,
}

impl ClientCertVerifier for AllowListClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = Fingerprint::of_certificate(end_entity)?;
        if self.allow.contains(&got) {
            Ok(ClientCertVerified::assertion())
        } else {
            self.allow.refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(fingerprint = %got, "refused a sender that is not in the allow-list");
            Err(rustls::Error::General(format!(
                "sender key {got} is not in the allow-list"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// rustls client config for a sender: presents `identity`, pins the receiver's key.
pub fn client_crypto(
    identity: &Identity,
    peer: Fingerprint,
) -> Result<rustls::ClientConfig, Error> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Identity(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
            expected: peer,
            signatures: Signatures(provider),
        }))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())
        .map_err(|e| Error::Identity(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// rustls server config for a receiver: presents `identity`, requires an allowed client key.
pub fn server_crypto(
    identity: &Identity,
    allow: Arc<LiveAllowList>,
) -> Result<rustls::ServerConfig, Error> {
    let provider = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Identity(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AllowListClientVerifier {
            allow,
            signatures: Signatures(provider),
        }))
        .with_single_cert(vec![identity.cert.clone()], identity.private_key())
        .map_err(|e| Error::Identity(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_across_loads_and_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let a = Identity::generate(&path).unwrap();
        let b = Identity::load(&path).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.cert, b.cert, "certificates are minted per start");
        let text = a.fingerprint.to_string();
        assert_eq!(Fingerprint::parse(&text).unwrap(), a.fingerprint);
        assert_eq!(
            Fingerprint::parse(&format!(" b3:{text}\n")).unwrap(),
            a.fingerprint
        );
        assert!(Identity::generate(&path).is_err(), "never overwrites a key");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bad_fingerprints_and_allow_lists_are_errors() {
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
        assert!(Fingerprint::parse(&"é".repeat(32)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let good = "ab".repeat(32);
        let path = dir.path().join("allow");
        std::fs::write(&path, format!("# senders\n{good}  # host a\n\n")).unwrap();
        let list = AllowList::load(&path).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.contains(&Fingerprint::parse(&good).unwrap()));
        std::fs::write(&path, format!("{good}\nnot-a-key\n")).unwrap();
        let err = AllowList::load(&path).unwrap_err().to_string();
        assert!(err.contains(":2:"), "{err}");
        assert!(Identity::load(&path).is_err());
    }

    #[test]
    fn a_live_allow_list_is_replaced_whole() {
        let a = Fingerprint::parse(&"aa".repeat(32)).unwrap();
        let b = Fingerprint::parse(&"bb".repeat(32)).unwrap();
        let live = LiveAllowList::new(AllowList::from_fingerprints([a]));
        let before = live.current();
        assert!(live.contains(&a) && !live.contains(&b));
        let old = live.replace(AllowList::from_fingerprints([b]));
        assert!(old.contains(&a));
        assert!(!live.contains(&a) && live.contains(&b));
        // Whoever read the list before keeps the list they read.
        assert!(before.contains(&a));
    }
}
