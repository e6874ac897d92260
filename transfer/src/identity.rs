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
//!
//! **Key rotation with overlap.** A receiver's key changes without a moment in which some
//! sender cannot reach it, because both ends hold more than one key for a while:
//! - a receiver serves an [`IdentitySet`] (`--identity` repeated; the first is the
//!   *primary*), swapped whole on SIGHUP like the allow-list ([`LiveIdentities`]);
//! - a sender pins several fingerprints (`--peer` repeated, preferred first) and accepts a
//!   receiver presenting any of them;
//! - the sender says which keys it pins in the TLS server name (SNI), since a TLS server
//!   presents one certificate and must choose it from the ClientHello alone: one DNS label per
//!   pinned key, the first [`NAME_PREFIX_HEX`] hex digits of its fingerprint, in the sender's
//!   order, then `shardxfer` ([`server_name_for`]). The receiver presents the first identity
//!   it holds that a label names, else its primary ([`IdentitySet::choose`]). Senders from
//!   before rotation sent the bare name `shardxfer`, and get the primary.
//!
//! So a sender succeeds whenever the receiver holds *any* key it pins, whatever the primary;
//! only a sender that names none (an old binary) depends on the primary. The name is a hint,
//! never trusted: the certificate is still checked against the full pinned fingerprints. A
//! 128-bit prefix cannot name a wrong identity among the few a receiver holds, and keeps seven
//! pins within a DNS name's 253 characters ([`MAX_NAMED_PINS`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::Error;
use crate::wire::offered_alpn_ids;

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

    /// The certificate and signing key rustls presents for this identity.
    fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, Error> {
        CertifiedKey::from_der(vec![self.cert.clone()], self.private_key(), provider)
            .map_err(|e| Error::Identity(format!("cannot use the key {}: {e}", self.fingerprint)))
    }
}

/// The last label of every server name a sender puts in its ClientHello.
pub const SERVER_NAME: &str = "shardxfer";
/// Hex digits of a pinned fingerprint named in the server name: one DNS label each.
pub const NAME_PREFIX_HEX: usize = 32;
/// Pinned keys named in the server name at most (7 labels of 33 characters + `shardxfer` fit
/// in a DNS name's 253); further pins are still accepted, just not asked for.
pub const MAX_NAMED_PINS: usize = 7;

/// The TLS server name a sender pinning `pins` (preferred first) connects with: one label per
/// pin, `<first 32 hex digits>.`, then `shardxfer`; `shardxfer` alone without pins.
pub fn server_name_for(pins: &[Fingerprint]) -> String {
    let mut seen = HashSet::new();
    let mut name = String::new();
    for fp in pins
        .iter()
        .filter(|fp| seen.insert(**fp))
        .take(MAX_NAMED_PINS)
    {
        let hex = fp.to_string();
        name.push_str(&hex[..NAME_PREFIX_HEX]);
        name.push('.');
    }
    name.push_str(SERVER_NAME);
    name
}

/// The fingerprint prefixes a server name asks for, in its order: each label before the final
/// `shardxfer` that is [`NAME_PREFIX_HEX`] hex digits (case ignored); anything else names
/// nothing.
pub fn named_prefixes(server_name: &str) -> Vec<[u8; NAME_PREFIX_HEX / 2]> {
    let Some(labels) = server_name
        .strip_suffix(SERVER_NAME)
        .and_then(|rest| rest.strip_suffix('.'))
    else {
        return Vec::new();
    };
    labels
        .split('.')
        .filter(|label| label.len() == NAME_PREFIX_HEX)
        .filter_map(|label| {
            let mut prefix = [0u8; NAME_PREFIX_HEX / 2];
            for (i, byte) in prefix.iter_mut().enumerate() {
                *byte = u8::from_str_radix(label.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(prefix)
        })
        .collect()
}

/// One identity a receiver serves: its fingerprint, what rustls presents, and its file.
#[derive(Debug, Clone)]
struct Served {
    fingerprint: Fingerprint,
    key: Arc<CertifiedKey>,
    source: PathBuf,
}

/// The identities a receiver serves, never empty; the first is the **primary**, presented to
/// senders that name none of them (see the module docs for the rule).
#[derive(Debug, Clone)]
pub struct IdentitySet {
    served: Vec<Served>,
}

impl IdentitySet {
    /// Loads every key file, in order; any unreadable file, or one key given twice, is an
    /// error naming it (so a reload with a bad file changes nothing).
    pub fn load(paths: &[PathBuf]) -> Result<IdentitySet, Error> {
        let identities = paths
            .iter()
            .map(|p| Identity::load(p).map(|id| (p.clone(), id)))
            .collect::<Result<Vec<_>, _>>()?;
        IdentitySet::from_identities(identities)
    }

    /// A set of identities already loaded (with the files they came from, for messages).
    pub fn from_identities(
        identities: impl IntoIterator<Item = (PathBuf, Identity)>,
    ) -> Result<IdentitySet, Error> {
        let provider = provider();
        let mut served: Vec<Served> = Vec::new();
        for (source, id) in identities {
            if let Some(earlier) = served.iter().find(|s| s.fingerprint == id.fingerprint) {
                return Err(Error::Input(format!(
                    "identity {} is given twice ({} and {})",
                    id.fingerprint,
                    earlier.source.display(),
                    source.display()
                )));
            }
            served.push(Served {
                fingerprint: id.fingerprint,
                key: Arc::new(id.certified_key(&provider)?),
                source,
            });
        }
        if served.is_empty() {
            return Err(Error::Input("no identity given".into()));
        }
        Ok(IdentitySet { served })
    }

    /// The key presented to senders that name none of ours.
    pub fn primary(&self) -> Fingerprint {
        self.served[0].fingerprint
    }

    /// Every fingerprint served, the primary first.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.served.iter().map(|s| s.fingerprint).collect()
    }

    pub fn len(&self) -> usize {
        self.served.len()
    }

    /// Never true (a set has its primary); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.served.is_empty()
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.served.iter().any(|s| s.fingerprint == *fp)
    }

    /// Which identity to present to a sender whose ClientHello carried `server_name`: the
    /// first one a label names, else the primary.
    pub fn choose(&self, server_name: Option<&str>) -> Fingerprint {
        self.served[self.choose_index(server_name)].fingerprint
    }

    fn choose_index(&self, server_name: Option<&str>) -> usize {
        server_name
            .map(named_prefixes)
            .unwrap_or_default()
            .iter()
            .find_map(|prefix| {
                self.served
                    .iter()
                    .position(|s| s.fingerprint.0[..prefix.len()] == prefix[..])
            })
            .unwrap_or(0)
    }

    /// `FP (primary), FP2`: for logs.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for (i, s) in self.served.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            text.push_str(&s.fingerprint.to_string());
            if i == 0 {
                text.push_str(" (primary)");
            }
        }
        text
    }
}

/// A value a running receiver swaps whole on reload (its identities, its allow-list): each
/// handshake reads the one in force then; connections already made keep theirs.
#[derive(Debug, Default)]
struct Swappable<T>(RwLock<Arc<T>>);

impl<T> Swappable<T> {
    fn new(value: T) -> Self {
        Swappable(RwLock::new(Arc::new(value)))
    }

    /// Puts `value` in force; returns the one it replaces.
    fn replace(&self, value: T) -> Arc<T> {
        let new = Arc::new(value);
        match self.0.write() {
            Ok(mut current) => std::mem::replace(&mut *current, new),
            // A panicked writer left nothing half-done (one pointer swap): take it over.
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    fn current(&self) -> Arc<T> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The identities of a running receiver: replaceable while it serves (SIGHUP), read by every
/// handshake to choose the certificate; counts how often each was presented.
#[derive(Debug)]
pub struct LiveIdentities {
    current: Swappable<IdentitySet>,
    presented: Mutex<HashMap<Fingerprint, u64>>,
}

impl LiveIdentities {
    pub fn new(set: IdentitySet) -> Self {
        LiveIdentities {
            current: Swappable::new(set),
            presented: Mutex::new(HashMap::new()),
        }
    }

    /// The set handshakes choose from from now on; returns the one it replaces. Connections
    /// already made keep the key they were made with.
    pub fn replace(&self, set: IdentitySet) -> Arc<IdentitySet> {
        self.current.replace(set)
    }

    pub fn current(&self) -> Arc<IdentitySet> {
        self.current.current()
    }

    /// Handshakes in which each identity was presented since the start (those no longer
    /// served included), by fingerprint.
    pub fn presented(&self) -> Vec<(Fingerprint, u64)> {
        let counts = match self.presented.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by_key(|(fp, _)| fp.0);
        v
    }
}

impl ResolvesServerCert for LiveIdentities {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current();
        let chosen = &set.served[set.choose_index(client_hello.server_name())];
        match self.presented.lock() {
            Ok(mut counts) => *counts.entry(chosen.fingerprint).or_default() += 1,
            Err(poisoned) => *poisoned.into_inner().entry(chosen.fingerprint).or_default() += 1,
        }
        Some(chosen.key.clone())
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
    current: Swappable<AllowList>,
    refusals: AtomicU64,
}

impl LiveAllowList {
    pub fn new(list: AllowList) -> Self {
        LiveAllowList {
            current: Swappable::new(list),
            refusals: AtomicU64::new(0),
        }
    }

    /// The list handshakes check from now on; returns the one it replaces.
    pub fn replace(&self, list: AllowList) -> Arc<AllowList> {
        self.current.replace(list)
    }

    pub fn current(&self) -> Arc<AllowList> {
        self.current.current()
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

/// Checks the receiver's key: a sender's pins it (any of `pinned` will do); a probe
/// (`pinned` none) takes any key and records in `proven` the one the receiver proved it holds.
#[derive(Debug)]
struct ServerKeyVerifier {
    pinned: Option<Vec<Fingerprint>>,
    proven: Option<Arc<ProbeResult>>,
    signatures: Signatures,
}

/// `A, B`: pinned fingerprints for messages.
fn list(fps: &[Fingerprint]) -> String {
    fps.iter()
        .map(Fingerprint::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ServerCertVerifier for ServerKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pinned) = &self.pinned else {
            return Ok(ServerCertVerified::assertion());
        };
        let got = Fingerprint::of_certificate(end_entity)?;
        if pinned.contains(&got) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "receiver key fingerprint {got} is not pinned (pinned: {})",
                list(pinned)
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
        let valid = self.signatures.tls13(message, cert, dss)?;
        if let Some(proven) = &self.proven {
            let fp = Fingerprint::of_certificate(cert)?;
            match proven.proven.lock() {
                Ok(mut p) => *p = Some(fp),
                Err(poisoned) => *poisoned.into_inner() = Some(fp),
            }
        }
        Ok(valid)
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

/// rustls client config for a sender: presents `identity`, accepts a receiver whose key is
/// one of `pins` (connect with [`server_name_for`]`(pins)` so the receiver knows which).
pub fn client_crypto(
    identity: &Identity,
    pins: &[Fingerprint],
) -> Result<rustls::ClientConfig, Error> {
    if pins.is_empty() {
        return Err(Error::Input(
            "no receiver fingerprint pinned (--peer)".into(),
        ));
    }
    let mut cfg = client_builder(Some(pins.to_vec()), None)?
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())
        .map_err(|e| Error::Identity(e.to_string()))?;
    cfg.alpn_protocols = offered_alpn_ids();
    Ok(cfg)
}

/// A TLS 1.3 client configuration checking the receiver's key with [`ServerKeyVerifier`],
/// up to the choice of a client certificate.
fn client_builder(
    pinned: Option<Vec<Fingerprint>>,
    proven: Option<Arc<ProbeResult>>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, Error> {
    let provider = provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Identity(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerKeyVerifier {
                pinned,
                proven,
                signatures: Signatures(provider),
            })),
    )
}

/// What a probe learnt: the key the receiver proved it holds (its handshake signature
/// verified against the certificate it presented).
#[derive(Debug, Default)]
pub struct ProbeResult {
    proven: Mutex<Option<Fingerprint>>,
}

impl ProbeResult {
    /// The fingerprint of the key the receiver signed the handshake with, if it got that far.
    pub fn proven(&self) -> Option<Fingerprint> {
        match self.proven.lock() {
            Ok(p) => *p,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }
}

/// rustls client config for asking a receiver which key it serves ([`crate::quic::probe`]):
/// no client certificate (the receiver refuses the connection once it has presented and
/// proved its own key, which is all the probe wants), any server key recorded in `result`.
pub fn probe_crypto(result: Arc<ProbeResult>) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = client_builder(None, Some(result))?.with_no_client_auth();
    cfg.alpn_protocols = offered_alpn_ids();
    Ok(cfg)
}

/// rustls server config for a receiver: presents one of `identities` (chosen per handshake,
/// see the module docs), requires an allowed client key.
pub fn server_crypto(
    identities: Arc<LiveIdentities>,
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
        .with_cert_resolver(identities);
    cfg.alpn_protocols = offered_alpn_ids();
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

    fn fp(byte: u8) -> Fingerprint {
        Fingerprint([byte; 32])
    }

    #[test]
    fn server_names_name_each_pin_by_a_dns_safe_prefix_in_order() {
        assert_eq!(server_name_for(&[]), "shardxfer");
        let a = Fingerprint::parse(&format!(
            "{}{}",
            "0123456789abcdef".repeat(2),
            "ff".repeat(16)
        ))
        .unwrap();
        assert_eq!(
            server_name_for(&[a]),
            "0123456789abcdef0123456789abcdef.shardxfer"
        );
        let (b, c) = (fp(0xbb), fp(0xcc));
        let name = server_name_for(&[b, a, b, c]);
        assert_eq!(
            name,
            format!(
                "{}.{}.{}.shardxfer",
                &b.to_string()[..32],
                &a.to_string()[..32],
                &c.to_string()[..32]
            ),
            "preferred first, each once"
        );
        // Many pins: only the first seven are named, and the name stays a valid DNS name.
        let many: Vec<Fingerprint> = (1..=12).map(fp).collect();
        let name = server_name_for(&many);
        assert_eq!(name.split('.').count(), MAX_NAMED_PINS + 1);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.split('.').all(|l| !l.is_empty() && l.len() <= 63));
        for pins in [&[][..], &[a][..], &many[..]] {
            let name = server_name_for(pins);
            assert!(
                ServerName::try_from(name.clone())
                    .is_ok_and(|n| matches!(n, ServerName::DnsName(_))),
                "{name}"
            );
            assert_eq!(named_prefixes(&name).len(), pins.len().min(MAX_NAMED_PINS));
        }
    }

    #[test]
    fn named_prefixes_read_only_well_formed_labels_before_shardxfer() {
        let a = fp(0xa1);
        let prefix = |f: Fingerprint| {
            let mut p = [0u8; 16];
            p.copy_from_slice(&f.0[..16]);
            p
        };
        assert_eq!(named_prefixes(&server_name_for(&[a])), vec![prefix(a)]);
        // Upper case is the same name.
        let upper = server_name_for(&[a])
            .to_ascii_uppercase()
            .replace("SHARDXFER", "shardxfer");
        assert_eq!(named_prefixes(&upper), vec![prefix(a)]);
        assert!(named_prefixes("shardxfer").is_empty());
        assert!(named_prefixes("example.org").is_empty());
        assert!(named_prefixes(&format!("{}.example.org", &a.to_string()[..32])).is_empty());
        // A label of the wrong length or with a non-hex digit names nothing; others still do.
        let name = format!(
            "{}.abc.{}.{}.shardxfer",
            &a.to_string()[..31],
            "zz".repeat(16),
            &a.to_string()[..32]
        );
        assert_eq!(named_prefixes(&name), vec![prefix(a)]);
        assert!(named_prefixes("xshardxfer").is_empty());
    }

    fn set_of(dir: &Path, names: &[&str]) -> (IdentitySet, Vec<Fingerprint>) {
        let mut loaded = Vec::new();
        let mut fps = Vec::new();
        for name in names {
            let path = dir.join(name);
            let id = match Identity::load(&path) {
                Ok(id) => id,
                Err(_) => Identity::generate(&path).unwrap(),
            };
            fps.push(id.fingerprint);
            loaded.push(path);
        }
        (IdentitySet::load(&loaded).unwrap(), fps)
    }

    #[test]
    fn a_receiver_presents_the_first_named_identity_it_holds_else_its_primary() {
        let dir = tempfile::tempdir().unwrap();
        let (set, fps) = set_of(dir.path(), &["old.key", "new.key"]);
        let (old, new) = (fps[0], fps[1]);
        assert_eq!(set.primary(), old);
        assert_eq!(set.fingerprints(), vec![old, new]);
        assert!(set
            .describe()
            .starts_with(&format!("{old} (primary), {new}")));
        let stranger = fp(0x5a);
        for (name, want) in [
            (None, old),
            (Some("shardxfer".to_string()), old),
            (Some("example.org".to_string()), old),
            (Some(server_name_for(&[stranger])), old),
            (Some(server_name_for(&[new])), new),
            (Some(server_name_for(&[old])), old),
            (Some(server_name_for(&[new, old])), new),
            (Some(server_name_for(&[old, new])), old),
            // The first *held* key in the sender's order wins.
            (Some(server_name_for(&[stranger, new, old])), new),
        ] {
            assert_eq!(set.choose(name.as_deref()), want, "{name:?}");
        }
        // The primary switched: senders naming nothing get the new key, the others what they ask.
        let (switched, _) = set_of(dir.path(), &["new.key", "old.key"]);
        assert_eq!(switched.choose(Some("shardxfer")), new);
        assert_eq!(switched.choose(Some(&server_name_for(&[old]))), old);
        assert_eq!(switched.choose(Some(&server_name_for(&[stranger]))), new);
    }

    #[test]
    fn identity_sets_refuse_duplicates_and_emptiness_and_swap_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (one, fps) = set_of(dir.path(), &["a.key"]);
        std::fs::copy(dir.path().join("a.key"), dir.path().join("copy.key")).unwrap();
        let err = IdentitySet::load(&[dir.path().join("a.key"), dir.path().join("copy.key")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("given twice") && err.contains("copy.key"),
            "{err}"
        );
        assert!(IdentitySet::load(&[]).is_err());
        let err = IdentitySet::load(&[dir.path().join("a.key"), dir.path().join("missing.key")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.key"), "{err}");

        let live = LiveIdentities::new(one);
        let before = live.current();
        let (two, fps2) = set_of(dir.path(), &["b.key", "a.key"]);
        let old = live.replace(two);
        assert_eq!(old.fingerprints(), fps);
        assert_eq!(live.current().primary(), fps2[0]);
        assert!(live.current().contains(&fps[0]));
        // Whoever read the set before keeps the set they read.
        assert_eq!(before.fingerprints(), fps);
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
