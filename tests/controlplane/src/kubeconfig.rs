//! Kubeconfigs in the shape k3s writes `/etc/rancher/k3s/k3s.yaml`: one cluster, one user,
//! one context, all named `default`, certificates inline. The stand-in API server
//! (`tests/apiserver`) writes its kubeconfigs with these too.

use base64::Engine as _;

use crate::certs::Pair;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn text(server: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: {server}
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
{user}",
        b64(ca_pem)
    )
}

/// A kubeconfig for the client certificate and key in `p`.
pub fn with_certificate(server: &str, ca_pem: &str, p: &Pair) -> String {
    text(
        server,
        ca_pem,
        &format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&p.cert_pem),
            b64(&p.key_pem)
        ),
    )
}

/// A kubeconfig with a bearer token.
pub fn with_token(server: &str, ca_pem: &str, token: &str) -> String {
    text(server, ca_pem, &format!("    token: {token}\n"))
}
