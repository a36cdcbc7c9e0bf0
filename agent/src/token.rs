//! The k3s join token a node's configuration points at: taken from the inventory's
//! `join_token_file` only when the file looks like a token.

use std::path::Path;

use anyhow::{anyhow, Context as _};

/// The join token in `path`, the inventory's `join_token_file`. Whoever can push to the
/// inventory chooses that path, and k3s sends the token to the join address: so only a
/// token-shaped file (one line of printable ASCII, at most 1 KiB, a regular file) is taken,
/// never `/etc/shadow` or a private key. The message never quotes the file.
pub fn from_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let refuse = |why: &str| {
        anyhow!(
            "join_token_file {}: {why}; it must hold only the k3s token (one line of printable ASCII, at most 1 KiB)",
            path.display()
        )
    };
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read join_token_file {}", path.display()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("cannot read join_token_file {}", path.display()))?
        .take(1025)
        .read_to_end(&mut bytes)?;
    if bytes.len() > 1024 {
        return Err(refuse("it is larger than a token"));
    }
    let text = String::from_utf8(bytes).map_err(|_| refuse("it is not text"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(refuse("it is empty"));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(refuse(
            "it holds more than one line, spaces or other characters",
        ));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_token_shaped_file_is_taken_as_the_join_token() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("token");
        std::fs::write(&ok, "K10abc::server:s3cret\n").unwrap();
        assert_eq!(from_file(&ok).unwrap(), "K10abc::server:s3cret");
        let shadow = dir.path().join("shadow");
        std::fs::write(
            &shadow,
            "root:$6$s3cret:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
        )
        .unwrap();
        let key = dir.path().join("key");
        std::fs::write(
            &key,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(5000)).unwrap();
        for (p, why) in [
            (&shadow, "more than one line"),
            (&key, "more than one line"),
            (&big, "larger than a token"),
            (&dir.path().to_path_buf(), "not a regular file"),
        ] {
            let e = from_file(p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("b3Blbn"), "{e}");
        }
    }
}
