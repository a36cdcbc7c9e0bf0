//! Fuzzing the parsers an attacker with push access (or on the path to a plain git remote)
//! reaches: inventory parsing and validation, rendering with arbitrary templates, and the
//! small parsers (kubeconfig, the kernel's route tables, a configuration's stateVersion).
//!
//! A seeded mutation fuzzer, so a run replays exactly: each input is a corpus entry (the
//! examples, the built-in template, a kubeconfig, route tables) mutated by byte flips,
//! deletions, duplications, splices and tokens of the syntaxes involved. Every input must
//! come back as a value or an error, never a panic. In the test suite a fixed budget runs
//! (`cargo test -p nk3-common --test fuzz`); `scripts/fuzz SECONDS` runs longer with a fresh
//! seed. A failure prints the seed and the input; pin it as a test in `tests/it/hostile.rs`.

#![allow(clippy::print_stdout)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use nk3_common::inventory;
use nk3_common::render::{HostFacts, Options, Source, Template};

/// xorshift64*: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{{",
    "}}",
    "{{#if ",
    "{{/if}}",
    "{{#each ",
    "{{/each}}",
    "{{else}}",
    "{{{",
    "}}}",
    "{{&",
    "{{~",
    "~}}",
    "{{> p}}",
    "{{#*inline \"p\"}}",
    "{{/inline}}",
    "{{nix ",
    "../",
    "@root",
    "this",
    "node.vars",
    "cluster.",
    "*a",
    "&a ",
    "!!str ",
    "!x ",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "  ",
    "\t",
    "'",
    "\"",
    "#",
    "|",
    ">",
    "<<: ",
    "\u{feff}",
    "0x1F",
    "+12",
    "0o17",
    "-1e309",
    "1e400",
    "::ffff:",
    "99999999999999999999",
    "~",
    "null",
    "true",
    "\\",
    "${",
    "''",
    "é",
    "\u{0}",
    "\r\n",
    "127.0.0.1",
    "fd00::1",
    "10.0.0.3",
    "nodes:",
    "join_address:",
    "role: agent",
    "initiator: true",
    "k3s_extra_flags: [",
    "--token=x",
    "--cluster-cidr=fd00::/56",
    "secondary_ip: ",
    "rollout:",
    "health_timeout: ",
    "9999999y",
    "vars:",
    "template: ",
    "hostname: ",
    "state_version: ",
    "certificate-authority-data: ",
    "token: ",
    "server: https://",
    "current-context: ",
    "00000000",
    "0003",
    "FFFFFFFF",
];

fn mutate(rng: &mut Rng, corpus: &[&str], input: &str) -> String {
    let mut b = input.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(64);
                b.drain(i..i + n);
            }
            2 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1).min(256);
                let piece = b[i..i + n].to_vec();
                let at = rng.below(b.len() + 1);
                for _ in 0..1 + rng.below(3) {
                    b.splice(at..at, piece.iter().copied());
                }
            }
            3 => {
                let other = corpus[rng.below(corpus.len())].as_bytes();
                let i = rng.below(other.len() + 1);
                let n = rng.below(other.len() - i + 1);
                let at = rng.below(b.len() + 1);
                b.splice(at..at, other[i..i + n].iter().copied());
            }
            _ => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let at = rng.below(b.len() + 1);
                b.splice(at..at, t.iter().copied());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Runs `target` on mutated inputs for `iterations` (or, with `NK3_FUZZ_SECONDS`, that
/// long); panics with the seed and the input on the first panic.
fn fuzz(name: &str, corpus: &[&str], iterations: usize, target: impl Fn(&str)) {
    let seconds: Option<u64> = std::env::var("NK3_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("NK3_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e6b_3366_757a_7a31);
    let mut rng = Rng(seed ^ name.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let until = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut n = 0usize;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    loop {
        let done = match until {
            Some(t) => Instant::now() >= t,
            None => n >= iterations,
        };
        if done {
            break;
        }
        let base = corpus[rng.below(corpus.len())];
        let mut input = mutate(&mut rng, corpus, base);
        // Sometimes mutate a mutant: deeper changes.
        while rng.below(3) == 0 {
            input = mutate(&mut rng, corpus, &input);
        }
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            std::panic::set_hook(quiet);
            panic!(
                "{name}: panicked on input {n} (NK3_FUZZ_SEED={seed}):\n{:?}",
                input
            );
        }
        n += 1;
    }
    std::panic::set_hook(quiet);
    println!("{name}: {n} inputs, no panic (seed {seed})");
}

const SEED: &str = include_str!("../../examples/inventory.yaml");
const FLAT: &str = include_str!("../../examples/flat/inventory.yaml");
const FULL: &str = include_str!("../../examples/full/inventory.yaml");
const IPV6: &str = include_str!("../../examples/ipv6/inventory.yaml");
const DUAL: &str = include_str!("../../examples/dual-stack/inventory.yaml");
const AGENTS: &str = include_str!("../../examples/agents/inventory.yaml");
const EDGE: &str = include_str!("../../examples/full/templates/edge.nix.hbs");

fn options() -> Options {
    Options {
        source: Source {
            repository: "https://git.example.com/infra.git".into(),
            commit: "c0ffee".into(),
        },
        token_file: "/var/lib/nk3-agent/join-token".into(),
        facts: HostFacts {
            interface: Some("eth0".into()),
            default_gateway: "10.0.0.1".parse().ok(),
            state_version: Some("24.05".into()),
        },
    }
}

#[test]
fn inventories() {
    let corpus = [SEED, FLAT, FULL, IPV6, DUAL, AGENTS];
    fuzz("inventory", &corpus, 4000, |text| {
        if let Err(d) = inventory::load("inventory.yaml", text) {
            let _ = d.lines();
        }
    });
}

#[test]
fn templates_render_or_refuse() {
    let corpus = [nk3_common::render::DEFAULT_TEMPLATE, EDGE];
    let inv = inventory::load("i", FULL).unwrap();
    let opts = options();
    fuzz("template", &corpus, 1500, |text| {
        if let Ok(t) = Template::custom("t", text) {
            for n in &inv.nodes {
                let _ = t.render(&inv, n, &opts);
            }
        }
    });
}

#[test]
fn inventories_render_with_the_builtin_template() {
    let corpus = [SEED, FLAT, FULL, IPV6, DUAL, AGENTS];
    let t = Template::builtin();
    let opts = options();
    fuzz("inventory+render", &corpus, 2000, |text| {
        if let Ok(inv) = inventory::load("i", text) {
            for n in &inv.nodes {
                let _ = t.render(&inv, n, &opts);
            }
        }
    });
}

#[test]
fn small_parsers() {
    let kubeconfig = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Q0E=\n    server: https://127.0.0.1:6443\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nkind: Config\nusers:\n- name: default\n  user:\n    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n";
    let route4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\neth0\t00000000\t01BE1EAC\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
    let route6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
    let config = "{ ... }: {\n  system.stateVersion = \"23.11\"; # Did you read the comment?\n}\n";
    let corpus = [kubeconfig, route4, route6, config];
    fuzz("small parsers", &corpus, 6000, |text| {
        let read = |_: &str| -> Result<Vec<u8>, String> { Err("no files".into()) };
        let _ = nk3_common::kubeconfig::parse(text, &read);
        let _ = nk3_common::identity::default_route_v4(text);
        let _ = nk3_common::identity::default_route_v6(text);
        let _ = nk3_common::render::state_version_in(text);
    });
}
