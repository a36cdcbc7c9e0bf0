//! One module per subcommand. Each returns the exit code, or an error for `main` to report.

pub mod credentials;
pub mod docs;
pub mod nudge;
pub mod plan;
pub mod render;
pub mod run;
pub mod status;
pub mod validate;

use std::path::Path;

use anyhow::Context as _;
use nk3_common::inventory::{self, Inventory};

/// Reads and validates an inventory file. Problems are printed to stderr, one per line, and
/// `Ok(None)` is returned, so the caller exits 1.
#[allow(clippy::print_stderr)]
pub fn load_inventory(path: &Path) -> anyhow::Result<Option<Inventory>> {
    let text = read_bounded(path, nk3_common::yaml::MAX_BYTES)
        .with_context(|| format!("cannot read inventory {}", path.display()))?;
    match inventory::load(&path.display().to_string(), &text) {
        Ok(inv) => Ok(Some(inv)),
        Err(diags) => {
            for line in diags.lines() {
                eprintln!("{line}");
            }
            let n = diags.count();
            eprintln!(
                "{}: {n} problem{}; nothing was rendered or applied",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            Ok(None)
        }
    }
}

/// A text file of at most `max` bytes, read without ever holding more (a path may name
/// `/dev/zero`, or a file that keeps growing).
pub fn read_bounded(path: &Path, max: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > max {
        anyhow::bail!("it is larger than {max} bytes, more than nk3 reads");
    }
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("it is not UTF-8 text"))
}
