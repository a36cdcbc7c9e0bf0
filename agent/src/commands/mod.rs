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
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read inventory {}", path.display()))?;
    match inventory::load(&path.display().to_string(), &text) {
        Ok(inv) => Ok(Some(inv)),
        Err(diags) => {
            for line in diags.lines() {
                eprintln!("{line}");
            }
            let n = diags.items.len();
            eprintln!(
                "{}: {n} problem{}; nothing was rendered or applied",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            Ok(None)
        }
    }
}
