//! Format rules for single inventory values. Each returns `Err` with a message that says what
//! is wrong and what would be right; the caller adds file, line and key.

/// Any text: no control characters (line breaks included), which no field needs and which
/// could otherwise break out of a comment or a line in the rendered file.
pub fn text(s: &str) -> Result<(), String> {
    match s.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some('\n') | Some('\r') => Err("contains a line break; values are single lines".into()),
        Some('\t') => Err("contains a tab character".into()),
        Some(c) => Err(format!("contains the control character U+{:04X}", c as u32)),
    }
}

/// Not empty, not only white space.
pub fn nonempty(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err("is empty".into())
    } else {
        Ok(())
    }
}

/// An interface name Linux accepts (the kernel's `dev_valid_name`).
pub fn interface(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("interface name is empty".into());
    }
    if s.len() > 15 {
        return Err(format!(
            "interface `{s}` is {} bytes long; Linux allows at most 15",
            s.len()
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("`{s}` is not a valid interface name"));
    }
    if s.ends_with(char::is_whitespace) {
        return Err(format!("interface `{s}` has trailing white space"));
    }
    if s.starts_with(char::is_whitespace) {
        return Err(format!("interface `{s}` has leading white space"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface `{s}` contains `{c}`, which Linux refuses in interface names"
        ));
    }
    Ok(())
}

/// A whole-disk device path for GRUB (`/dev/nvme0n1`), or `nodev` (GRUB on EFI only).
pub fn boot_device(s: &str) -> Result<(), String> {
    if s == "nodev" {
        return Ok(());
    }
    if !s.starts_with('/') {
        return Err(format!(
            "boot_device `{s}` is not an absolute path; write the disk's device path, e.g. `/dev/{s}`"
        ));
    }
    if !s.starts_with("/dev/") || s.len() == "/dev/".len() {
        return Err(format!(
            "boot_device `{s}` is not a device under /dev (e.g. /dev/nvme0n1 or /dev/disk/by-id/…)"
        ));
    }
    if s.ends_with('/') || s.contains("//") || s.split('/').any(|p| p == "." || p == "..") {
        return Err(format!(
            "boot_device `{s}` is not a plain device path (no `.`, `..`, `//` or trailing `/`)"
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!("boot_device `{s}` contains white space"));
    }
    Ok(())
}

/// A hostname NixOS accepts for `networking.hostName`: letters, digits, `-` and `_`, at most 63,
/// starting and ending with a letter or digit; no dots (the domain is `networking.domain`).
pub fn hostname(s: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || c == '-' || c == '_');
    if ok {
        Ok(())
    } else if s.contains('.') {
        Err(format!(
            "hostname `{s}` contains a dot; NixOS wants the short name here (letters, digits, `-`, `_`)"
        ))
    } else {
        Err(format!("hostname `{s}` is not one NixOS accepts: 1 to 63 letters, digits, `-` or `_`, starting and ending with a letter or digit"))
    }
}

/// An SMBIOS product UUID as `/sys/class/dmi/id/product_uuid` shows it.
pub fn smbios_uuid(s: &str) -> Result<(), String> {
    match uuid::Uuid::try_parse(s) {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "`{s}` is not a UUID (as in /sys/class/dmi/id/product_uuid)"
        )),
    }
}

/// An absolute path on the node.
pub fn absolute_path(s: &str) -> Result<(), String> {
    if s.starts_with('/') && !s.split('/').any(|p| p == "..") {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not an absolute path on the node (it must start with `/` and have no `..`)"
        ))
    }
}

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An OpenSSH public key line: `<type> <base64> [comment]`.
pub fn ssh_public_key(s: &str) -> Result<(), String> {
    let mut parts = s.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "not an OpenSSH public key: it should start with one of {}",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    if blob.len() < 16 || !blob.chars().all(base64) {
        return Err(format!("the `{kind}` key's data is missing or not base64"));
    }
    Ok(())
}

/// A NixOS release such as `24.05`.
pub fn state_version(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    if b.len() == 5
        && b[2] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a NixOS release; write it like \"24.05\" (quoted)"
        ))
    }
}

/// A channel name such as `nixos-24.05` or `nixos-unstable`.
pub fn channel(s: &str) -> Result<(), String> {
    let ok = s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a channel name such as nixos-24.05 (letters, digits, `.`, `-`, `_`)"
        ))
    }
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn namespace(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a Kubernetes namespace name (lower-case letters, digits and `-`, at most 63)"))
    }
}

/// One k3s command-line flag.
pub fn k3s_flag(s: &str) -> Result<(), String> {
    // Messages name the flag, never its value: a value may be a secret.
    let name = s.split_once('=').map_or(s, |(n, _)| n);
    let name: String = name.chars().take(60).collect();
    if !s.starts_with('-') {
        return Err(
            "this is not a flag: k3s flags start with `-` (e.g. `--disable=traefik`); in a `[…]` list a comma splits a value, so quote a flag whose value has one".into(),
        );
    }
    if s.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{name}…` contains white space; give each flag as its own list item, `--flag=value`"
        ));
    }
    if matches!(name.as_str(), "--token" | "-t" | "--agent-token") {
        return Err(format!(
            "`{name}` passes a token on the command line, where every user of the node can read it; use `join_token` or `join_token_file`"
        ));
    }
    // Flags land in the world-readable Nix store and in the process list.
    let secret_flag = matches!(
        name.as_str(),
        "--etcd-s3-secret-key" | "--etcd-s3-session-token" | "--vpn-auth" | "--cluster-secret"
    );
    let value = s.split_once('=').map_or("", |(_, v)| v);
    let url_password = value
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|auth| auth.rsplit_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    let query_password = value.to_ascii_lowercase().contains("password=");
    if secret_flag || url_password || query_password {
        return Err(format!(
            "`{name}` would carry a secret in the rendered configuration, which lands in the world-readable Nix store; give it to k3s from a file instead (`--etcd-s3-config-secret`, `--vpn-auth-file`, or an environment file such as K3S_DATASTORE_ENDPOINT in services.k3s.environmentFile)"
        ));
    }
    Ok(())
}

/// A template path inside the repository.
pub fn template_path(s: &str) -> Result<(), String> {
    if s.is_empty() || s.starts_with('/') || s.split('/').any(|p| p == "..") {
        Err(format!(
            "template `{s}` must be a relative path inside the repository (no leading `/`, no `..`)"
        ))
    } else {
        Ok(())
    }
}

/// A name a template can refer to (`node.vars.rack`).
pub fn var_name(s: &str) -> Result<(), String> {
    let ok = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not usable as a template variable name (letters, digits and `_`, not starting with a digit)"))
    }
}

/// An `http://` or `https://` URL without white space.
pub fn http_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.chars().any(char::is_whitespace) => Ok(()),
        _ => Err(format!("`{s}` is not an http:// or https:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel() {
        assert!(interface("enp3s0f0").is_ok());
        assert!(interface("eth0.100").is_ok());
        assert!(interface("enp3s0f0 ").unwrap_err().contains("trailing"));
        assert!(interface("averyveryverylongname")
            .unwrap_err()
            .contains("at most 15"));
        assert!(interface("eth0:1").unwrap_err().contains("`:`"));
        assert!(interface("..").is_err());
    }

    #[test]
    fn hostnames_follow_nixos() {
        assert!(hostname("d752cf78-d889-5bd9-8dd4-2bb7eeb898f4").is_ok());
        assert!(hostname("node_1").is_ok());
        assert!(hostname("-x").is_err());
        assert!(hostname("a.example.com").unwrap_err().contains("dot"));
        assert!(hostname(&"a".repeat(64)).is_err());
    }

    #[test]
    fn only_flags_that_carry_a_token_are_refused() {
        assert!(k3s_flag("--token=abc")
            .unwrap_err()
            .contains("passes a token"));
        assert!(k3s_flag("--agent-token=abc").is_err());
        assert!(k3s_flag("--kube-apiserver-arg=service-account-max-token-expiration=48h").is_ok());
        assert!(k3s_flag("--token-file=/run/keys/t").is_ok());
        assert!(k3s_flag("disable=traefik").is_err());
    }

    #[test]
    fn state_versions_are_releases() {
        assert!(state_version("24.05").is_ok());
        assert!(state_version("24.5").is_err());
        assert!(state_version("unstable").is_err());
    }
}
