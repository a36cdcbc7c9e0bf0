//! Parse + validate + render one node of a 5,000-node inventory (target: 50 ms in release).
//! Run with `cargo bench -p nk3-common`.

use std::fmt::Write as _;

use criterion::{criterion_group, criterion_main, Criterion};
use nk3_common::inventory;
use nk3_common::render::{HostFacts, Options, Source, Template, DEFAULT_TOKEN_FILE};

/// A flat-layout inventory of `n` nodes on a /16, the first one initiating.
fn inventory_text(n: usize) -> String {
    let mut s = String::from("join_address: 10.1.0.1\njoin_token: bench\ndefault_gateway: 10.1.255.254\nprefix_length: 16\nrollout:\n  max_unavailable: 1\nnodes:\n");
    for i in 0..n {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        writeln!(
            s,
            "  {ip}:\n    initiator: {}\n    interface: enp3s0f0\n    boot_device: /dev/nvme0n1",
            i == 0
        )
        .unwrap();
    }
    s
}

fn bench(c: &mut Criterion) {
    let text = inventory_text(5000);
    let target = "10.1.10.1";
    let opts = Options {
        source: Source {
            repository: "https://git.example.com/infra.git".into(),
            commit: "0".repeat(40),
        },
        token_file: DEFAULT_TOKEN_FILE.into(),
        facts: HostFacts {
            state_version: Some("23.11".into()),
            ..HostFacts::default()
        },
    };
    c.bench_function("load+validate+render 1 of 5000 nodes", |b| {
        b.iter(|| {
            let inv = inventory::load("inventory.yaml", &text).expect("valid");
            let node = inv.node(target).expect("present");
            Template::builtin()
                .render(&inv, node, &opts)
                .expect("renders")
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
