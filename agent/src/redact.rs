//! What a diff or a message may show of configuration.nix: every secret the inventory
//! holds, and the values of keys that name a token, password or secret, are replaced by
//! `<redacted>` before they reach a log line.

use nk3_common::inventory::Inventory;

/// Every secret value of the inventory, for redaction.
pub(crate) fn secrets(inv: &Inventory) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = &inv.join_token {
        out.push(t.expose().to_string());
    }
    if let Some(f) = &inv.join_token_file {
        if let Ok(t) = std::fs::read_to_string(f) {
            out.push(t.trim().to_string());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A unified diff from `old` to `new`, with every secret replaced by `<redacted>`, and
/// string values of keys that name a token, password or secret hidden too (a hand-edited
/// file may carry them).
pub fn diff(old: &str, new: &str, secrets: &[String]) -> String {
    let d = similar::TextDiff::from_lines(old, new);
    let text = d
        .unified_diff()
        .context_radius(3)
        .header(
            "configuration.nix (on disk)",
            "configuration.nix (rendered)",
        )
        .to_string();
    redact(&text, secrets)
}

/// Hides secrets in text for logs and status.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "<redacted>");
    }
    out.lines()
        .map(redact_assignment)
        .collect::<Vec<_>>()
        .join("\n")
        + if out.ends_with('\n') { "\n" } else { "" }
}

/// Words that mark a name as holding a secret (matched in lower case).
const SECRET_WORDS: &[&str] = &[
    "token",
    "passw",
    "secret",
    "credential",
    "privatekey",
    "private_key",
    "apikey",
    "api_key",
    "accesskey",
    "access_key",
    "psk",
    "auth",
];

fn secret_name(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| n.contains(w))
        && !n.ends_with("file")
        && !n.contains("file\"")
        && !n.contains("authorizedkeys")
}

/// A line with what looks secret hidden: the string of an assignment whose name says secret
/// (`token = "…";`, `password`, `secretKey`… but not `tokenFile`), the value of a secret
/// flag (`"--etcd-s3-secret-key=…"`), and the password of a URL (`postgres://u:…@h`).
fn redact_assignment(line: &str) -> String {
    let mut out = line.to_string();
    if let Some(lhs) = line.split('=').next() {
        if secret_name(lhs) {
            if let (Some(a), Some(b)) = (line.find('"'), line.rfind('"')) {
                if b > a {
                    out = format!("{}\"<redacted>\"{}", &line[..a], &line[b + 1..]);
                }
            }
        }
    }
    // `--flag=value` where the flag's name says secret.
    let mut rebuilt = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("--") {
        rebuilt.push_str(&rest[..i]);
        let flag = &rest[i..];
        let end = flag
            .find(|c: char| c == '"' || c.is_whitespace())
            .unwrap_or(flag.len());
        let (whole, after) = flag.split_at(end);
        match whole.split_once('=') {
            Some((name, _)) if secret_name(name) => {
                rebuilt.push_str(name);
                rebuilt.push_str("=<redacted>");
            }
            _ => rebuilt.push_str(whole),
        }
        rest = after;
    }
    rebuilt.push_str(rest);
    // `scheme://user:password@host`.
    let mut out = String::with_capacity(rebuilt.len());
    let mut rest = rebuilt.as_str();
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        let auth = &rest[i + 3..];
        let end = auth
            .find(|c: char| c == '/' || c == '"' || c.is_whitespace())
            .unwrap_or(auth.len());
        match auth[..end].rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(&format!("{user}:<redacted>@{host}"));
            }
            _ => out.push_str(&auth[..end]),
        }
        rest = &auth[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_hide_the_token_and_token_like_assignments() {
        let old = "{\n  services.k3s.token = \"abc123\";\n  x = 1;\n}\n";
        let new = "{\n  services.k3s.tokenFile = \"/var/lib/nk3-agent/join-token\";\n  x = 2; # abc123\n}\n";
        let d = diff(old, new, &["abc123".to_string()]);
        assert!(!d.contains("abc123"), "{d}");
        assert!(d.contains("-  services.k3s.token = \"<redacted>\";"), "{d}");
        assert!(
            d.contains("+  services.k3s.tokenFile = \"/var/lib/nk3-agent/join-token\";"),
            "{d}"
        );
        assert!(d.contains("+  x = 2; # <redacted>"), "{d}");
    }

    #[test]
    fn hand_edits_with_other_secrets_are_hidden_too() {
        for (line, hidden) in [
            ("  services.foo.secretKey = \"AKIAS3CR3T\";", "AKIAS3CR3T"),
            (
                "  environment.variables.API_KEY = \"k-s3cr3t\";",
                "k-s3cr3t",
            ),
            (
                "  networking.wireless.networks.x.psk = \"wifi-s3cr3t\";",
                "wifi-s3cr3t",
            ),
            (
                "  users.users.ops.hashedPassword = \"$6$s3cr3t\";",
                "$6$s3cr3t",
            ),
            (
                "    extraFlags = [ \"--etcd-s3-secret-key=S3CR3T\" \"--disable=traefik\" ];",
                "S3CR3T",
            ),
            (
                "    extraFlags = [ \"--datastore-endpoint=postgres://k3s:pa55@db:5432/k3s\" ];",
                "pa55",
            ),
            (
                "    extraFlags = [ \"--vpn-auth=name=tailscale,joinKey=tskey-s3cr3t\" ];",
                "tskey-s3cr3t",
            ),
        ] {
            let r = redact(line, &[]);
            assert!(!r.contains(hidden), "{line} -> {r}");
        }
        let kept = "    extraFlags = [ \"--disable=traefik\" \"--node-ip=10.0.0.3\" ];\n  services.k3s.tokenFile = \"/run/t\";";
        assert_eq!(redact(kept, &[]), kept);
    }
}
