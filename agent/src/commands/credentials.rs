//! `nk3-agent credentials NODE`: run on a server, makes the least-privilege credentials an
//! agent-role node needs to roll under the lease (see `access`), and writes them as a
//! kubeconfig for the operator to copy to that node. Idempotent: run again, it puts the
//! roles back as they should be and writes the same token; `--rotate` makes a new one.
//!
//! The token is a long-lived ServiceAccount token Secret, not a bound (TokenRequest) token:
//! a bound token expires, and the agent cannot get a new one while its own has run out or
//! its node was off for longer than the token lived; a node that cannot reach the API does
//! not roll. The Secret is revoked by deleting it, and renewed with `--rotate`.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::access::{self, Object, ACCOUNTS};
use crate::cli::CredentialsArgs;
use crate::kube::Kube;

/// How long the token controller may take to fill in the Secret.
const TOKEN_WAIT: Duration = Duration::from_secs(30);

/// Makes or mends the roles, the node's account and its token; writes the kubeconfig.
pub fn run(args: &CredentialsArgs) -> anyhow::Result<ExitCode> {
    let mut host = args.node.clone();
    let mut max_unavailable = args.max_unavailable.unwrap_or(1);
    let mut ceph = None;
    let mut server = args.server.clone();
    if let Some(path) = &args.inventory {
        let Some(inv) = super::load_inventory(path)? else {
            return Ok(ExitCode::FAILURE);
        };
        let node = inv.node(&args.node).ok_or_else(|| {
            anyhow!(
                "{}: no node {} (give its address or hostname)",
                path.display(),
                args.node
            )
        })?;
        host = node.hostname.clone();
        max_unavailable = args.max_unavailable.unwrap_or(inv.rollout.max_unavailable);
        ceph = inv.rollout.ceph.as_ref().map(|c| c.namespace.clone());
        if server.is_none() {
            server = Some(match inv.join_address {
                std::net::IpAddr::V4(a) => format!("https://{a}:6443"),
                std::net::IpAddr::V6(a) => format!("https://[{a}]:6443"),
            });
        }
    }
    let dns_label = !host.is_empty()
        && host.len() <= 63
        && !host.starts_with('-')
        && !host.ends_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !dns_label {
        bail!("{host:?} is not a Kubernetes node name (lower-case letters, digits and `-`, at most 63): give the node's hostname, or its address with --inventory");
    }
    let text = std::fs::read_to_string(&args.kubeconfig).with_context(|| {
        format!(
            "cannot read {} (the admin credentials k3s writes on a server; or pass --kubeconfig)",
            args.kubeconfig.display()
        )
    })?;
    let read = |p: &str| std::fs::read(p).map_err(|e| e.to_string());
    let admin = nk3_common::kubeconfig::parse(&text, &read)
        .map_err(|e| anyhow!("{}: {e}", args.kubeconfig.display()))?;
    let server = match server {
        Some(s) => s,
        None if is_loopback(&admin.server) => bail!(
            "{} names {}, this server itself, which {host} cannot reach: pass --server https://<an address of the servers>:6443, or --inventory to use its join address",
            args.kubeconfig.display(),
            admin.server
        ),
        None => admin.server.clone(),
    };
    let kube = Kube::new(&admin)?;
    // The roles are every agent node's: never narrow them (another node's credentials made
    // with a larger max_unavailable, or the Ceph check, keep working).
    let lease = args.lease.rollout_lease();
    let role = format!(
        "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/roles/{}",
        lease.namespace,
        access::ROLE
    );
    let slot_prefix = format!("{}-", lease.name);
    if let Some(existing) = kube.get::<Value>(&role)? {
        let slots = existing["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["resourceNames"].as_array().into_iter().flatten())
            .filter_map(|n| {
                n.as_str()?
                    .strip_prefix(slot_prefix.as_str())?
                    .parse::<u32>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(1);
        max_unavailable = max_unavailable.max(slots);
    }
    let perms = access::permissions(&host, &lease, max_unavailable, ceph.as_deref());
    for o in access::objects(&host, &perms) {
        let what = apply(&kube, &o)?;
        println!("{what:<9} {}", o.describe);
    }
    let token = token(&kube, &host, args.rotate)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("nk3-{host}.kubeconfig")));
    let config =
        nk3_common::kubeconfig::with_token(&server, &admin.ca_pem, &access::account(&host), &token)
            .map_err(|e| anyhow!("{e}"))?;
    crate::state::write_atomic(&out, config.as_bytes(), 0o600)?;
    println!(
        "wrote {} for {host} (API at {server}; leases for max_unavailable {max_unavailable}{})",
        out.display(),
        ceph.map(|ns| format!(", the Ceph check in {ns}"))
            .unwrap_or_default()
    );
    println!(
        "copy it to {host} as /var/lib/nk3-agent/kubeconfig (owner root, mode 0600) and set services.nk3-agent.kubeconfig = \"/var/lib/nk3-agent/kubeconfig\";"
    );
    println!(
        "revoke it with `kubectl -n {ACCOUNTS} delete secret {}`, replace it with `nk3-agent credentials {host} --rotate`",
        access::token_secret(&host)
    );
    Ok(ExitCode::SUCCESS)
}

fn is_loopback(server: &str) -> bool {
    let url = reqwest::Url::parse(server).ok();
    let Some(host) = url.as_ref().and_then(|u| u.host_str()) else {
        return false;
    };
    let host = host.trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Creates `o`, or puts the fields nk3 owns back; says which. A binding whose role
/// reference changed is made again (Kubernetes does not let roleRef change).
fn apply(kube: &Kube, o: &Object) -> anyhow::Result<&'static str> {
    let path = o.path();
    let Some(current) = kube.get::<Value>(&path)? else {
        kube.post_json(&o.collection, &o.body)?;
        return Ok("created");
    };
    if Object::owned(&current) == Object::owned(&o.body) {
        return Ok("unchanged");
    }
    if current["roleRef"] != o.body["roleRef"] && !current["roleRef"].is_null() {
        kube.delete(&path)?;
        kube.post_json(&o.collection, &o.body)?;
        return Ok("replaced");
    }
    let mut body = o.body.clone();
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    kube.put_json(&path, &body)?;
    Ok("updated")
}

/// The node's long-lived token: from its Secret, made (or, with `rotate`, made again) if
/// need be, once the token controller has filled it in.
fn token(kube: &Kube, host: &str, rotate: bool) -> anyhow::Result<String> {
    let name = access::token_secret(host);
    let collection = format!("/api/v1/namespaces/{ACCOUNTS}/secrets");
    let path = format!("{collection}/{name}");
    let account = access::account(host);
    let existing = kube.get::<Value>(&path)?;
    let ours = |s: &Value| {
        s["type"] == "kubernetes.io/service-account-token"
            && s["metadata"]["annotations"]["kubernetes.io/service-account.name"]
                == account.as_str()
    };
    if let Some(s) = &existing {
        if !ours(s) {
            bail!("secret {ACCOUNTS}/{name} exists and is not {account}'s token: nk3 leaves it alone; delete it or rename the node");
        }
    }
    if rotate && existing.is_some() {
        kube.delete(&path)?;
        // The old one is gone when a GET no longer finds it (deletion is not instant).
        let until = Instant::now() + TOKEN_WAIT;
        while kube.get::<Value>(&path)?.is_some() {
            if Instant::now() > until {
                bail!("secret {ACCOUNTS}/{name} was not deleted within {TOKEN_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if rotate || existing.is_none() {
        kube.post_json(
            &collection,
            &json!({
                "apiVersion": "v1", "kind": "Secret",
                "type": "kubernetes.io/service-account-token",
                "metadata": {
                    "name": name, "namespace": ACCOUNTS,
                    "labels": { "app.kubernetes.io/managed-by": "nk3" },
                    "annotations": { "kubernetes.io/service-account.name": account },
                },
            }),
        )?;
        println!(
            "{:<9} secret {ACCOUNTS}/{name}",
            if rotate { "rotated" } else { "created" }
        );
    } else {
        println!("{:<9} secret {ACCOUNTS}/{name}", "unchanged");
    }
    let until = Instant::now() + TOKEN_WAIT;
    loop {
        if let Some(s) = kube.get::<Value>(&path)? {
            if let Some(t) = s["data"]["token"].as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(|_| anyhow!("secret {ACCOUNTS}/{name}: the token is not base64"))?;
                return String::from_utf8(bytes)
                    .map_err(|_| anyhow!("secret {ACCOUNTS}/{name}: the token is not text"));
            }
        }
        if Instant::now() > until {
            bail!("the token controller did not fill in secret {ACCOUNTS}/{name} within {TOKEN_WAIT:?}: is kube-controller-manager running?");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_yaml_names_this_server_itself() {
        assert!(is_loopback("https://127.0.0.1:6443"));
        assert!(is_loopback("https://[::1]:6443"));
        assert!(is_loopback("https://localhost:6443"));
        assert!(!is_loopback("https://10.0.0.3:6443"));
        assert!(!is_loopback("https://[fd00::3]:6443"));
    }
}
