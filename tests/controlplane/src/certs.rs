//! Certificates made at test time, as k3s makes them: an EC (P-256) cluster CA, the API
//! server's serving certificate for 127.0.0.1, client certificates whose subject carries the
//! user (CN) and groups (O), keys written as SEC1 `EC PRIVATE KEY` like k3s's
//! `/etc/rancher/k3s/k3s.yaml`, and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority")
    }
}

/// A certificate and its key, PEM (the key SEC1).
#[derive(Clone)]
pub struct Pair {
    /// The certificate.
    pub cert_pem: String,
    /// The private key, `-----BEGIN EC PRIVATE KEY-----`.
    pub key_pem: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pair { <certificate and key> }")
    }
}

impl Authority {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        Authority { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(
        &self,
        cn: &str,
        groups: &[&str],
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Pair {
        let mut params = CertificateParams::new(sans).expect("params");
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pair {
            cert_pem: cert.pem(),
            key_pem: sec1_pem(&key),
        }
    }

    /// The API server's serving certificate.
    pub fn server(&self) -> Pair {
        self.issue(
            "kube-apiserver",
            &[],
            vec![
                "127.0.0.1".into(),
                "localhost".into(),
                "kubernetes".into(),
                "kubernetes.default.svc".into(),
                "10.43.0.1".into(),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate for user `cn` in `groups`.
    pub fn client(&self, cn: &str, groups: &[&str]) -> Pair {
        self.issue(cn, groups, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A new P-256 key: (private PKCS#8 PEM, public PEM), to sign service-account tokens.
pub fn signing_key_pem() -> (String, String) {
    let k = KeyPair::generate().expect("key");
    (k.serialize_pem(), k.public_key_pem())
}

/// The key as SEC1 (`EC PRIVATE KEY`, with the curve named), as Go's
/// `x509.MarshalECPrivateKey` writes it for k3s.
fn sec1_pem(key: &KeyPair) -> String {
    use base64::Engine as _;
    let der = key.serialize_der();
    // ring's PKCS#8 for P-256 holds `02 01 01 04 20 <scalar>` … `a1 44 03 42 00 <point>`.
    let find = |needle: &[u8]| {
        der.windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + needle.len())
            .expect("a P-256 PKCS#8 key")
    };
    let scalar = &der[find(&[0x02, 0x01, 0x01, 0x04, 0x20])..][..32];
    let point = &der[find(&[0xa1, 0x44, 0x03, 0x42, 0x00])..][..65];
    let mut body = vec![0x02, 0x01, 0x01, 0x04, 0x20];
    body.extend_from_slice(scalar);
    // [0] namedCurve prime256v1
    body.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    body.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    body.extend_from_slice(point);
    let mut sec1 = vec![0x30, u8::try_from(body.len()).expect("short")];
    sec1.extend_from_slice(&body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&sec1);
    let mut pem = String::from("-----BEGIN EC PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64"));
        pem.push('\n');
    }
    pem.push_str("-----END EC PRIVATE KEY-----\n");
    pem
}
