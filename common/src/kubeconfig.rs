//! Reading a kubeconfig: the file k3s writes (`/etc/rancher/k3s/k3s.yaml`: server, inline CA,
//! client certificate and key) or one with a bearer token for agent-role nodes. Only the
//! current context's cluster and user are read. Secrets are never put in error messages.

use base64::Engine as _;

use crate::yaml::{self, Yaml};

/// How the agent reaches and authenticates to the k3s API.
#[derive(Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// `https://host:port`, without a trailing slash.
    pub server: String,
    /// PEM of the CA that signs the server's certificate. TLS is always verified.
    pub ca_pem: Vec<u8>,
    /// How the agent proves who it is.
    pub auth: Auth,
}

/// Client credentials. `Debug` names the kind only.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// A client certificate and its key, both PEM.
    Certificate {
        /// The certificate chain.
        cert_pem: Vec<u8>,
        /// The private key.
        key_pem: Vec<u8>,
    },
    /// A bearer token.
    Token(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Certificate { .. } => "client certificate <redacted>",
            Auth::Token(_) => "bearer token <redacted>",
        })
    }
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.auth {
            Auth::Certificate { .. } => "client certificate",
            Auth::Token(_) => "bearer token",
        };
        f.debug_struct("KubeConfig")
            .field("server", &self.server)
            .field("auth", &auth)
            .finish_non_exhaustive()
    }
}

/// Why a kubeconfig cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kubeconfig: {0}")]
pub struct Error(pub String);

fn err(s: impl Into<String>) -> Error {
    Error(s.into())
}

fn get<'a>(map: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    match map {
        Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
}

fn str_of<'a>(map: &'a Yaml, key: &str) -> Option<&'a str> {
    match get(map, key) {
        Some(Yaml::Str(s)) => Some(s),
        _ => None,
    }
}

/// The entry of list `list` (`clusters`, `users`, `contexts`) named `name`, or the only one.
fn named<'a>(doc: &'a Yaml, list: &str, name: Option<&str>) -> Result<&'a Yaml, Error> {
    let Some(Yaml::Seq(items)) = get(doc, list) else {
        return Err(err(format!("no `{list}` list")));
    };
    let found = match name {
        Some(n) => items.iter().find(|i| str_of(i, "name") == Some(n)),
        None if items.len() == 1 => items.first(),
        None => None,
    };
    let item = found.ok_or_else(|| match name {
        Some(n) => err(format!("no entry named `{n}` in `{list}`")),
        None => err(format!(
            "`{list}` has several entries and no current-context chooses"
        )),
    })?;
    let inner = list.trim_end_matches('s');
    get(item, inner).ok_or_else(|| err(format!("entry of `{list}` has no `{inner}`")))
}

/// Inline data (base64) or a file the value names (read with `read_file`).
fn data(
    section: &Yaml,
    key: &str,
    read_file: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<Option<Vec<u8>>, Error> {
    if let Some(b64) = str_of(section, &format!("{key}-data")) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| err(format!("`{key}-data` is not base64")))?;
        return Ok(Some(bytes));
    }
    match str_of(section, key) {
        Some(path) => read_file(path)
            .map(Some)
            .map_err(|e| err(format!("`{key}`: cannot read {path}: {e}"))),
        None => Ok(None),
    }
}

/// Parses a kubeconfig. `read_file` reads files it names (`certificate-authority`, …).
pub fn parse(
    text: &str,
    read_file: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<KubeConfig, Error> {
    let doc = yaml::parse(text).map_err(|e| match e.line {
        Some(l) => err(format!("line {l}: {}", e.message)),
        None => err(e.message),
    })?;
    let current = str_of(&doc, "current-context");
    let (cluster_name, user_name) = match current {
        Some(c) => {
            let ctx = named(&doc, "contexts", Some(c))?;
            (str_of(ctx, "cluster"), str_of(ctx, "user"))
        }
        None => (None, None),
    };
    let cluster = named(&doc, "clusters", cluster_name)?;
    let user = named(&doc, "users", user_name)?;
    let server = str_of(cluster, "server")
        .ok_or_else(|| err("the cluster has no `server`"))?
        .trim_end_matches('/')
        .to_string();
    if !server.starts_with("https://") {
        return Err(err(format!(
            "server {server} is not https://; nk3 only talks to the API over verified TLS"
        )));
    }
    if matches!(
        get(cluster, "insecure-skip-tls-verify"),
        Some(Yaml::Bool(true))
    ) {
        return Err(err(
            "insecure-skip-tls-verify is set; nk3 always verifies the API's certificate",
        ));
    }
    let ca_pem = data(cluster, "certificate-authority", read_file)?
        .ok_or_else(|| err("the cluster has no certificate-authority(-data)"))?;
    let auth = if let Some(token) = str_of(user, "token") {
        Auth::Token(token.trim().to_string())
    } else if let Some(file) = str_of(user, "tokenFile") {
        let t = read_file(file).map_err(|e| err(format!("tokenFile: cannot read {file}: {e}")))?;
        Auth::Token(String::from_utf8_lossy(&t).trim().to_string())
    } else {
        let cert_pem = data(user, "client-certificate", read_file)?;
        let key_pem = data(user, "client-key", read_file)?;
        match (cert_pem, key_pem) {
            (Some(cert_pem), Some(key_pem)) => Auth::Certificate { cert_pem, key_pem },
            _ => {
                return Err(err(
                    "the user has neither a token nor a client certificate and key",
                ))
            }
        }
    };
    Ok(KubeConfig {
        server,
        ca_pem,
        auth,
    })
}

/// A kubeconfig with a bearer token, in the shape [`parse`] reads: what `nk3-agent
/// credentials` writes for an agent-role node. `server` must be an `https://` URL; the
/// token is a ServiceAccount token (a JWT: letters, digits, `-`, `_` and `.`).
pub fn with_token(server: &str, ca_pem: &[u8], user: &str, token: &str) -> Result<String, Error> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    };
    if !server.starts_with("https://")
        || server
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        return Err(Error(format!(
            "the server must be an https:// URL, not {server:?}"
        )));
    }
    if !plain(user) {
        return Err(Error(format!("{user:?} is not a user name")));
    }
    if !plain(token) || token.contains(':') {
        return Err(Error("the token is not a ServiceAccount token".into()));
    }
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    Ok(format!(
        "apiVersion: v1
kind: Config
clusters:
- name: k3s
  cluster:
    server: \"{server}\"
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: {user}
  context:
    cluster: k3s
    user: {user}
current-context: {user}
"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_credentials_writes_reads_back() {
        let text = with_token(
            "https://10.0.0.1:6443",
            b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
            "nk3-agent-n1",
            "eyJhbGci.eyJpc3Mi.c2ln-_",
        )
        .unwrap();
        let k = parse(&text, &no_files).unwrap();
        assert_eq!(k.server, "https://10.0.0.1:6443");
        assert!(k.ca_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert_eq!(k.auth, Auth::Token("eyJhbGci.eyJpc3Mi.c2ln-_".into()));
        assert!(with_token("http://10.0.0.1:6443", b"CA", "u", "t").is_err());
        assert!(with_token("https://a\"\nb", b"CA", "u", "t").is_err());
        assert!(with_token("https://a", b"CA", "u", "t\nuser: x").is_err());
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn no_files(p: &str) -> Result<Vec<u8>, String> {
        Err(format!("no file {p} in this test"))
    }

    #[test]
    fn reads_what_k3s_writes() {
        let text = format!(
            "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {}
    client-key-data: {}
",
            b64("CA"),
            b64("CERT"),
            b64("KEY")
        );
        let k = parse(&text, &no_files).unwrap();
        assert_eq!(k.server, "https://127.0.0.1:6443");
        assert_eq!(k.ca_pem, b"CA");
        assert_eq!(
            k.auth,
            Auth::Certificate {
                cert_pem: b"CERT".to_vec(),
                key_pem: b"KEY".to_vec()
            }
        );
        assert!(!format!("{k:?}").contains("KEY"));
    }

    #[test]
    fn tokens_files_and_refusals() {
        let with_token = "clusters:\n- name: c\n  cluster: { server: 'https://10.0.0.1:6443/', certificate-authority: /ca.pem }\nusers:\n- name: u\n  user: { token: abc }\n";
        let files = |p: &str| -> Result<Vec<u8>, String> {
            (p == "/ca.pem")
                .then(|| b"CAFILE".to_vec())
                .ok_or_else(|| "missing".to_string())
        };
        let k = parse(with_token, &files).unwrap();
        assert_eq!(k.server, "https://10.0.0.1:6443");
        assert_eq!(k.ca_pem, b"CAFILE");
        assert_eq!(k.auth, Auth::Token("abc".into()));
        let plain = with_token.replace("https://", "http://");
        assert!(parse(&plain, &files).unwrap_err().0.contains("not https"));
        let insecure = with_token.replace(
            "certificate-authority: /ca.pem",
            "insecure-skip-tls-verify: true",
        );
        assert!(parse(&insecure, &files)
            .unwrap_err()
            .0
            .contains("always verifies"));
        let no_user = with_token.replace("{ token: abc }", "{ }");
        assert!(parse(&no_user, &files)
            .unwrap_err()
            .0
            .contains("neither a token"));
        let err = parse(&with_token.replace("abc", "s3cret-token\n  bad: ["), &files).unwrap_err();
        assert!(!err.0.contains("s3cret"), "{err}");
    }
}
