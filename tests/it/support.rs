//! Shared helpers: paths, the binary, Nix evaluation, the examples.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The original tool's example inventory, `examples/inventory.yaml`.
pub fn seed_inventory() -> String {
    std::fs::read_to_string(root().join("examples/inventory.yaml")).unwrap()
}

/// The real binary under test.
pub fn nk3() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nk3-agent"));
    c.current_dir(root());
    c.env_remove("NK3_NODE").env_remove("NK3_STATE_DIR");
    // The release the test machines were installed with (`fixtures::INSTALLER_CONFIG`), for
    // inventories that set none, as the original tool's do.
    c.env("NK3_STATE_VERSION", "23.11");
    c
}

/// Runs a command, returning its output; panics only if it cannot start.
pub fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One example inventory and how it is rendered for the golden files.
pub struct Example {
    pub name: &'static str,
    pub inventory: &'static str,
    /// Extra `render` flags: facts an inventory leaves to the node (interface, gateway).
    pub facts: &'static [&'static str],
}

pub const EXAMPLES: &[Example] = &[
    // The original tool's inventories set no stateVersion: on a node it comes from the
    // configuration.nix being replaced, here from the command line.
    Example {
        name: "seed",
        inventory: "examples/inventory.yaml",
        facts: &["--state-version", "23.11"],
    },
    Example {
        name: "flat",
        inventory: "examples/flat/inventory.yaml",
        facts: &[
            "--interface",
            "enp3s0f0",
            "--default-gateway",
            "172.30.190.1",
            "--state-version",
            "23.11",
        ],
    },
    Example {
        name: "full",
        inventory: "examples/full/inventory.yaml",
        facts: &[],
    },
    Example {
        name: "ipv6",
        inventory: "examples/ipv6/inventory.yaml",
        facts: &[],
    },
    Example {
        name: "dual-stack",
        inventory: "examples/dual-stack/inventory.yaml",
        facts: &[],
    },
    Example {
        name: "agents",
        inventory: "examples/agents/inventory.yaml",
        facts: &[],
    },
];

pub const REPOSITORY: &str = "https://git.example.com/infra.git";
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Renders every node of `ex` with the real binary into a fresh directory; returns
/// (directory guard, [(file name, text)]) sorted by name.
pub fn render_all(ex: &Example) -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let o = run(nk3()
        .args(["render", "--inventory", ex.inventory, "--all", "--out"])
        .arg(dir.path())
        .args(["--repository", REPOSITORY, "--commit", COMMIT])
        .args(ex.facts));
    assert!(
        o.status.success(),
        "render {} failed: {}",
        ex.name,
        stderr(&o)
    );
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    (dir, files)
}

/// The nix-instantiate the tests use; the test command installs Debian's nix-bin.
pub fn nix_instantiate() -> Command {
    let mut c = Command::new("nix-instantiate");
    // No channels, no store writes needed for parsing and evaluation.
    c.env("NIX_PATH", "");
    c
}

/// Evaluates a Nix expression strictly and returns its JSON value.
pub fn nix_eval_json(expr: &str) -> serde_json::Value {
    let o = nix_instantiate()
        .args(["--eval", "--strict", "--json", "--expr", expr])
        .output()
        .expect("nix-instantiate is needed (Debian package nix-bin; the README's test command installs it)");
    assert!(
        o.status.success(),
        "nix-instantiate failed on {expr}:\n{}",
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A Nix expression that imports a rendered configuration.nix with stand-in arguments and
/// leaves out `imports` (those files exist only on a node).
pub fn config_expr(path: &Path) -> String {
    format!(
        "(removeAttrs (import {} {{ config = {{ }}; lib = {{ }}; pkgs = {{ }}; }}) [ \"imports\" ])",
        path.display()
    )
}

/// The built-in template with a `# nk3-test: <marker>` line the stand-in `nixos-rebuild`
/// acts on (`fail-build`, `k3s-broken`, `slow-build`: see `tests/bin/nixos-rebuild`).
pub fn marked_template(marker: &str) -> String {
    let t = std::fs::read_to_string(root().join("common/src/render/default.nix.hbs")).unwrap();
    format!("# nk3-test: {marker}\n{t}")
}
