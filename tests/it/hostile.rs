//! The hostile-input catalogue: what someone who can push to the inventory repository could
//! commit, thought up as an attacker would. Each case runs the real binary (`validate`, or
//! `render --all`, which reads, validates and renders every node) under a memory limit and a
//! time limit, and asserts a clear refusal naming the problem, or a safe result — never a
//! panic, an abort, a hang, or memory beyond the limit. The fuzz targets (`common/tests/fuzz.rs`)
//! look for more; what they find is pinned here.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Address space a run may take: far above what any case needs when it is handled, far below
/// what an unbounded expansion would take.
const MEMORY: u64 = 2 << 30;
/// Time a run may take.
const TIME: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Run {
    Validate,
    Render,
}

enum Expect {
    /// Exit 1, and stderr says this.
    Refused(&'static str),
    /// Exit 0, and every rendered file parses as Nix.
    Safe,
    /// Exit 0, and the rendered file's `x` evaluates to exactly this value.
    Evaluates(serde_json::Value),
}

struct Attack {
    what: &'static str,
    run: Run,
    inventory: Vec<u8>,
    /// `templates/t.nix.hbs` in the repository, for `template: templates/t.nix.hbs`.
    template: Option<String>,
    expect: Expect,
}

/// A template whose `x` is the value `v`, as a Nix string.
const X: &str = "{ ... }: { x = {{node.vars.v}}; }";

const BASE: &str = "join_address: 10.0.0.3
join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
default_gateway: 10.0.0.1
state_version: \"24.05\"
";

/// A flat inventory: `BASE`, then `extra` cluster lines, then one node with `node` keys.
fn inv(extra: &str, node: &str) -> Vec<u8> {
    format!("{BASE}{extra}nodes:\n  10.0.0.3: {{ initiator: true, interface: eth0, boot_device: /dev/sda{node} }}\n").into_bytes()
}

fn with_template(template: &str, vars: &str) -> (Vec<u8>, Option<String>) {
    (
        inv(
            &format!("template: templates/t.nix.hbs\nvars: {{ {vars} }}\n"),
            "",
        ),
        Some(template.to_string()),
    )
}

fn refused(what: &'static str, run: Run, inventory: Vec<u8>, message: &'static str) -> Attack {
    Attack {
        what,
        run,
        inventory,
        template: None,
        expect: Expect::Refused(message),
    }
}

fn template(what: &'static str, t: &str, vars: &str, expect: Expect) -> Attack {
    let (inventory, template) = with_template(t, vars);
    Attack {
        what,
        run: Run::Render,
        inventory,
        template,
        expect,
    }
}

fn attacks() -> Vec<Attack> {
    use serde_json::json;
    use Expect::{Evaluates, Refused, Safe};
    use Run::{Render, Validate};
    let reads = "{ ... }: { x = {{ &node.vars.v}}; }";
    let a = vec![
        // 1. Raw insertion, however spelt: the value would read any file into the config.
        template("raw insertion with a space", reads, "v: 'builtins.readFile /etc/shadow'", Refused("inserts a value unquoted")),
        template("raw insertion with ~ and a space", "{ x = {{~ &node.vars.v}}; }", "v: x", Refused("inserts a value unquoted")),
        template("raw insertion with a line break", "{ x = {{\n&node.vars.v}}; }", "v: x", Refused("inserts a value unquoted")),
        template("triple stash with spaces", "{ x = {{~ {node.vars.v} ~}}; }", "v: x", Refused("inserts a value unquoted")),
        template("raw insertion inside a block", "{ {{#if node.vars.v}}{{#each node.vars}}x = {{  & this}};{{/each}}{{/if}} }", "v: x", Refused("inserts a value unquoted")),
        template("raw insertion in an else branch", "{ {{#if node.uuid}}{{else}}x = {{{node.vars.v}}};{{/if}} }", "v: x", Refused("inserts a value unquoted")),
        template("an interpolation stays text", X, "v: '${builtins.readFile /etc/shadow}'", Evaluates(json!("${builtins.readFile /etc/shadow}"))),
        template("a value closing its string", X, "v: '\"; y = builtins.readFile /etc/shadow; z = \"'", Evaluates(json!("\"; y = builtins.readFile /etc/shadow; z = \""))),
        template("an indented-string closer and a backslash", X, "v: \"'' \\\\ ${x} ''${y}\"", Evaluates(json!("'' \\ ${x} ''${y}"))),
        template("a key of vars closing its name", "{ ... }: { x = {{nix node.vars}}; }", "'a\" = 1; b': 2", Refused("is not usable as a template variable name")),
        template("a value of vars with a key closing its name", "{ ... }: { x = {{nix node.vars.v}}; }", "v: { 'a\" = 1; b': 2 }", Evaluates(json!({"a\" = 1; b": 2}))),
        // 2. Crash loops: recursion, nesting, numbers.
        template("a recursive inline partial", "{{#*inline \"p\"}}{{> p}}{{/inline}}{{> p}}", "v: x", Refused("partials and decorators")),
        template("partials nested to grow exponentially", "{{#*inline \"a\"}}xx{{/inline}}{{#*inline \"b\"}}{{> a}}{{> a}}{{/inline}}{{> b}}", "v: x", Refused("partials and decorators")),
        template("blocks nested ten thousand deep", &("{{#if node.vars.v}}".repeat(10_000) + &"{{/if}}".repeat(10_000)), "v: x", Refused("nest deeper than 64")),
        template("a template of two megabytes", &"x".repeat(2 << 20), "v: x", Refused("larger than 1048576 bytes")),
        template("a loop multiplying the output", "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}xxxxxxxxxxxxxxxxxxxxxxxxxx{{/each}}{{/each}}{{/each}}", &format!("a: [{}]", vec!["1"; 200].join(", ")), Refused("the rendered configuration is over")),
        template("loops with nothing to write, nested four deep", "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}{{#each ../../../node.vars.a}}{{/each}}{{/each}}{{/each}}{{/each}}", &format!("a: [{}]", vec!["1"; 200].join(", ")), Refused("could take more than 10000000 iterations")),
        template("negative numbers and exponents through nix", "{ ... }: { x = {{nix node.vars.n}}; }", "n: [1, -5, 1.5e+300, -0.5, 2]", Evaluates(json!([1, -5, 1.5e300, -0.5, 2]))),
        refused("a health timeout of a hundred million years", Validate, inv("rollout: { health_timeout: 100000000y }\n", ""), "is longer than nk3 waits for anything"),
        refused("a drain timeout of i64::MAX seconds", Validate, inv("rollout: { drain_timeout: 9223372036854775807 }\n", ""), "is longer than nk3 waits for anything"),
        refused("a lease of u64::MAX seconds", Validate, inv("rollout: { lease_duration: 18446744073709551615 }\n", ""), "lease_duration"),
        refused("an upgrade interval beyond a year", Validate, inv("nix_channel: nixos-24.05\nrollout: { upgrade_every: 400d }\n", ""), "at most 366 days"),
        refused("max_unavailable beyond any cluster", Validate, inv("rollout: { max_unavailable: 4294967296 }\n", ""), "max_unavailable"),
        refused("a prefix length past the address", Validate, inv("", ", prefix_length: 200"), "prefix_length"),
        // 3. Exhaustion from small inputs.
        refused("a billion laughs", Validate, {
            let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
            for i in 1..10 {
                s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![format!("*a{}", i - 1); 9].join(", ")));
            }
            s.push_str(BASE);
            s.into_bytes()
        }, "anchors and aliases"),
        refused("one big anchor and thousands of aliases", Validate, {
            let big = vec!["\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\""; 15_000].join(", ");
            let aliases = vec!["*big"; 3000].join(", ");
            inv(&format!("vars:\n  big: &big [{big}]\n  copies: [{aliases}]\n"), "")
        }, "could expand beyond a sane size"),
        refused("a file of 17 MiB", Validate, {
            let mut v = inv("", "");
            v.extend(std::iter::repeat_n(b'#', 17 << 20));
            v
        }, "larger than"),
        refused("lists nested a hundred thousand deep", Validate, {
            let mut v = BASE.as_bytes().to_vec();
            v.extend(b"vars: { deep: ");
            v.extend(std::iter::repeat_n(b'[', 100_000));
            v.extend(std::iter::repeat_n(b']', 100_000));
            v.extend(b" }\n");
            v
        }, "nest deeper"),
        refused("fifty thousand bad nodes", Validate, {
            let mut s = format!("{BASE}nodes:\n");
            for i in 0..50_000u32 {
                s.push_str(&format!("  10.{}.{}.{}: {{ interfce: eth0 }}\n", i >> 16, (i >> 8) & 255, i & 255));
            }
            s.into_bytes()
        }, "more problems (the first 200 are shown)"),
        // 5. Secrets: never quoted, never rendered into the store.
        refused("a token as a k3s flag", Validate, inv("k3s_extra_flags: [--token=hunter2-s3cret]\n", ""), "passes a token on the command line"),
        refused("a datastore password as a flag", Validate, inv("k3s_server_flags: [\"--datastore-endpoint=postgres://k3s:hunter2-s3cret@db/k3s\"]\n", ""), "would carry a secret"),
        refused("an S3 secret key as a flag", Validate, inv("k3s_server_flags: [--etcd-s3-secret-key=hunter2-s3cret]\n", ""), "would carry a secret"),
        refused("a VPN join key as a flag", Validate, inv("k3s_extra_flags: [\"--vpn-auth=name=tailscale,joinKey=hunter2-s3cret\"]\n", ""), "would carry a secret"),
        // 6. Values silently changed.
        refused("a hex number as an interface", Validate, inv("", ", interface: 0x1F").into_iter().collect::<Vec<u8>>().replace_first(b"interface: eth0, ", b""), "YAML reads this as the number 31"),
        refused("an octal number as the token", Validate, BASE.replace("join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55", "join_token: 0o17").into_bytes().then_nodes(), "YAML reads this as the number"),
        refused("a plus-signed number as the token", Validate, BASE.replace("join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55", "join_token: +12").into_bytes().then_nodes(), "YAML reads this as the number"),
        refused("a core schema tag", Validate, inv("nameservers: !!seq [1.1.1.1]\n", ""), "YAML tags such as `!!seq`"),
        refused("a local tag", Validate, inv("vars: { v: !include /etc/shadow }\n", ""), "YAML tags such as `!include`"),
        Attack { what: "a byte-order mark", run: Validate, inventory: [b"\xef\xbb\xbf".as_slice(), &inv("", "")].concat(), template: None, expect: Safe },
        Attack { what: "CRLF line ends", run: Render, inventory: String::from_utf8(inv("", "")).unwrap().replace('\n', "\r\n").into_bytes(), template: None, expect: Safe },
        refused("not UTF-8", Validate, [inv("", ""), b"# \xff\xfe\n".to_vec()].concat(), "not UTF-8"),
        refused("a NUL byte in a value", Validate, inv("", ", hostname: \"a\\0b\""), "control character"),
        // 7. Validation gaps.
        refused("one address in two spellings", Validate, format!("{BASE}nodes:\n  10.0.0.3: {{ initiator: true, interface: e, boot_device: /dev/sda }}\n  \"::ffff:10.0.0.3\": {{ interface: e, boot_device: /dev/sda }}\n").into_bytes(), "is the same address as node 10.0.0.3"),
        refused("hostnames differing in case", Validate, format!("{BASE}nodes:\n  10.0.0.3: {{ initiator: true, interface: e, boot_device: /dev/sda, hostname: web }}\n  10.0.0.4: {{ interface: e, boot_device: /dev/sda, hostname: WEB }}\n").into_bytes(), "hostname `WEB` is also node 10.0.0.3"),
        refused("a loopback node every machine matches", Validate, format!("{BASE}nodes:\n  10.0.0.3: {{ initiator: true, interface: e, boot_device: /dev/sda }}\n  127.0.0.1: {{ interface: e, boot_device: /dev/sda }}\n").into_bytes(), "loopback"),
        refused("the unspecified address as a node", Validate, format!("{BASE}nodes:\n  10.0.0.3: {{ initiator: true, interface: e, boot_device: /dev/sda }}\n  0.0.0.0: {{ interface: e, boot_device: /dev/sda }}\n").into_bytes(), "unspecified"),
        // More an attacker would try.
        refused("a template outside the repository", Validate, inv("template: ../../../etc/shadow\n", ""), "must be a relative path inside the repository"),
        refused("an absolute template path", Validate, inv("template: /etc/shadow\n", ""), "must be a relative path inside the repository"),
        refused("a hostname breaking out of its string", Validate, inv("", ", hostname: 'a\"; b'"), "hostname"),
        // Linux takes `e"th0` as an interface name, and GRUB's device is an argument, not a
        // shell word: both stay strings.
        Attack { what: "an interface with a quote", run: Render, inventory: inv("", "").replace_first(b"interface: eth0", b"interface: 'e\"th0'"), template: None, expect: Safe },
        Attack { what: "a boot device with a command in it", run: Render, inventory: inv("", "").replace_first(b"boot_device: /dev/sda", b"boot_device: '/dev/$(reboot)'"), template: None, expect: Safe },
        refused("a channel with a shell command", Validate, inv("nix_channel: 'nixos-24.05; reboot'\n", ""), "nix_channel"),
        refused("a state version breaking out", Validate, inv("", "").replace_first(b"state_version: \"24.05\"", b"state_version: '24.05\"; x = \"'"), "state_version"),
        refused("an ssh key with a second line", Validate, inv("ssh_authorized_keys: [\"ssh-ed25519 AAAA x\\nssh-rsa AAAA evil\"]\n", ""), "ssh_authorized_keys"),
        refused("a flag with a line break", Validate, inv("k3s_extra_flags: [\"--node-label=a\\nb\"]\n", ""), "k3s_extra_flags"),
        refused("a zone id in an address", Validate, format!("{BASE}nodes:\n  \"fe80::1%eth0\": {{ initiator: true, interface: e }}\n").into_bytes(), "is not an IP address"),
        refused("a merge key", Validate, inv("defaults: &d { interface: eth0 }\n", "").replace_first(b"nodes:", b"x: 1\nnodes:"), "unknown key"),
        refused("a health check reading files over HTTP", Validate, inv("rollout: { health_checks: [ { name: x, http: 'file:///etc/shadow' } ] }\n", ""), "health_checks"),
        refused("a namespace that is no namespace", Validate, inv("watch_namespaces: ['kube-system/../x']\n", ""), "watch_namespaces"),
        refused("a join token file elsewhere than absolute", Validate, BASE.replace("join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55", "join_token_file: ../shadow").into_bytes().then_nodes(), "join_token_file"),
        refused("an empty document", Validate, b"---\n...\n".to_vec(), "empty"),
        refused("a list at the top", Validate, b"- 1\n- 2\n".to_vec(), "mapping"),
        refused("a key of a megabyte", Validate, inv(&format!("{}: 1\n", "k".repeat(1 << 20)), ""), "not valid YAML"),
        Attack { what: "ten thousand valid nodes", run: Validate, inventory: {
            let mut s = format!("{}nodes:\n  10.0.0.3: {{ initiator: true, interface: e, boot_device: /dev/sda }}\n", BASE.replace("10.0.0.1", "10.0.0.1\nprefix_length: 16"));
            for i in 0..10_000u32 {
                s.push_str(&format!("  10.0.{}.{}: {{ role: agent, interface: e, boot_device: /dev/sda }}\n", 1 + (i >> 8), i & 255));
            }
            s.into_bytes()
        }, template: None, expect: Safe },
    ];
    a
}

trait Bytes {
    fn replace_first(self, from: &[u8], to: &[u8]) -> Vec<u8>;
    fn then_nodes(self) -> Vec<u8>;
}

impl Bytes for Vec<u8> {
    fn replace_first(self, from: &[u8], to: &[u8]) -> Vec<u8> {
        match self.windows(from.len()).position(|w| w == from) {
            Some(i) => [&self[..i], to, &self[i + from.len()..]].concat(),
            None => panic!("{:?} not in the inventory", String::from_utf8_lossy(from)),
        }
    }

    fn then_nodes(mut self) -> Vec<u8> {
        self.extend(
            b"nodes:\n  10.0.0.3: { initiator: true, interface: eth0, boot_device: /dev/sda }\n",
        );
        self
    }
}

/// Runs one attack through the binary under the limits; what went wrong, if anything.
fn attack(a: &Attack, dir: &Path) -> Option<String> {
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("templates")).unwrap();
    std::fs::write(repo.join("inventory.yaml"), &a.inventory).unwrap();
    if let Some(t) = &a.template {
        std::fs::write(repo.join("templates/t.nix.hbs"), t).unwrap();
    }
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    // Under `ulimit -v` (KiB) from the shell, which then becomes the agent.
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -v {} && exec \"$0\" \"$@\"", MEMORY / 1024))
        .arg(env!("CARGO_BIN_EXE_nk3-agent"));
    match a.run {
        Run::Validate => {
            c.arg("validate").arg(repo.join("inventory.yaml"));
        }
        Run::Render => {
            c.args(["render", "--all", "--out"])
                .arg(&out)
                .arg("--inventory")
                .arg(repo.join("inventory.yaml"))
                .args(["--state-version", "24.05"]);
        }
    }
    c.current_dir(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let Some((status, stderr)) = crate::fixtures::stderr_within(c.spawn().unwrap(), TIME) else {
        return Some(format!("still running after {TIME:?}"));
    };
    let tail: String = stderr.chars().take(600).collect();
    if let Some(sig) = status.signal() {
        return Some(format!("killed by signal {sig}: {tail}"));
    }
    if stderr.contains("panicked") || status.code() == Some(101) {
        return Some(format!("panicked: {tail}"));
    }
    if stderr.contains("hunter2-s3cret") {
        return Some(format!("a secret was quoted back: {tail}"));
    }
    match &a.expect {
        Expect::Refused(m) => {
            if status.code() != Some(1) || !stderr.contains(m) {
                return Some(format!(
                    "expected a refusal saying `{m}`, got exit {:?}: {tail}",
                    status.code()
                ));
            }
        }
        Expect::Safe | Expect::Evaluates(_) => {
            if !status.success() {
                return Some(format!(
                    "expected success, got exit {:?}: {tail}",
                    status.code()
                ));
            }
            if a.run == Run::Render {
                for f in std::fs::read_dir(&out).unwrap() {
                    let path = f.unwrap().path();
                    let text = std::fs::read_to_string(&path).unwrap();
                    let parse = crate::support::nix_instantiate()
                        .arg("--parse")
                        .arg(&path)
                        .output()
                        .unwrap();
                    if !parse.status.success() {
                        return Some(format!(
                            "{} is not Nix: {}\n{text}",
                            path.display(),
                            String::from_utf8_lossy(&parse.stderr)
                        ));
                    }
                    if let Expect::Evaluates(want) = &a.expect {
                        let got = crate::support::nix_eval_json(&format!(
                            "(import {} {{ }}).x",
                            path.display()
                        ));
                        if &got != want {
                            return Some(format!("x is {got}, not {want}:\n{text}"));
                        }
                    }
                }
            }
        }
    }
    None
}

#[test]
fn every_attack_is_refused_or_harmless_within_memory_and_time() {
    let attacks = attacks();
    assert!(attacks.len() >= 50, "{}", attacks.len());
    let mut failures = Vec::new();
    for a in &attacks {
        let dir = tempfile::tempdir().unwrap();
        if let Some(f) = attack(a, dir.path()) {
            failures.push(format!("{}: {f}", a.what));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} attacks got through:\n{}",
        failures.len(),
        attacks.len(),
        failures.join("\n")
    );
}
