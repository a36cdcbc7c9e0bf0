//! Every bad inventory is refused with a message naming its line and key, and nothing else
//! about the file is lost: all problems are reported in one run.

use nk3_common::inventory::{self, Diagnostics};

/// A valid inventory in the original tool's layout; cases edit it by line number.
const SEED: &str = "\
cluster:
  join_address: 10.0.0.3
  join_token: 2f909ce8-cae1-439a-86b3-da87b7ee9f55
  default_gateway: 10.0.0.1
  nodes:
    10.0.0.3:
      initiator: true
      interface: eth0
      boot_device: /dev/sda
    10.0.0.4:
      initiator: false
      interface: eth0
      boot_device: /dev/sda
    10.0.0.5:
      initiator: false
      interface: eth0
      boot_device: /dev/sda
";

/// The seed with lines replaced (1-based, as in the original); an empty replacement deletes
/// the line, and a replacement may hold several lines.
fn seed(edits: &[(usize, &str)]) -> String {
    let mut out = String::new();
    for (i, line) in SEED.lines().enumerate() {
        match edits.iter().find(|(n, _)| *n == i + 1) {
            Some((_, "")) => {}
            Some((_, r)) => {
                out.push_str(r);
                out.push('\n');
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn flat(nodes: &str) -> String {
    format!("join_address: 10.0.0.3\njoin_token: t\ndefault_gateway: 10.0.0.1\nnodes:\n{nodes}")
}

fn errors(text: &str) -> Diagnostics {
    match inventory::load("inventory.yaml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(d) => d,
    }
}

struct Case {
    what: &'static str,
    text: String,
    /// `inventory.yaml:LINE: ` is expected in front of the message.
    line: Option<usize>,
    message: &'static str,
}

fn case(what: &'static str, text: String, line: Option<usize>, message: &'static str) -> Case {
    Case {
        what,
        text,
        line,
        message,
    }
}

fn cases() -> Vec<Case> {
    let big = format!("{SEED}# {}\n", "x".repeat(17 * 1024 * 1024));
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        ));
    }
    bomb.push_str(SEED);
    vec![
        case("misspelt node key", seed(&[(8, "      interfce: eth0")]), Some(8), "nodes.10.0.0.3.interfce: unknown key `interfce`; did you mean `interface`?"),
        case("misspelt cluster key", seed(&[(4, "  default_gatway: 10.0.0.1")]), Some(4), "unknown key `default_gatway`; did you mean `default_gateway`?"),
        case("unknown key, nothing close", seed(&[(9, "      boot_device: /dev/sda\n      rack_position: 7")]), Some(10), "unknown key `rack_position`; known keys here: initiator, interface"),
        case("cluster key outside cluster:", format!("{SEED}nix_channel: nixos-24.05\n"), Some(18), "`nix_channel` belongs under `cluster:` in this layout"),
        case("duplicate key", seed(&[(9, "      boot_device: /dev/sda\n      boot_device: /dev/sdb")]), Some(10), "duplicate key `boot_device`"),
        case("duplicate node", seed(&[(10, "    10.0.0.3:")]), Some(10), "duplicate key `10.0.0.3`"),
        case("same address written twice", flat("  \"fd00::3\": {boot_device: /dev/sda, interface: e}\n  \"fd00:0::3\": {boot_device: /dev/sda, interface: e}\n").replace("10.0.0.3", "fd00::3").replace("10.0.0.1", "fd00::1"), Some(6), "node fd00:0::3 is the same address as node fd00::3 (line 5)"),
        case("two initiators", seed(&[(11, "      initiator: true")]), Some(11), "node 10.0.0.4 is a second initiator; node 10.0.0.3 (line 6) already bootstraps the cluster"),
        case("malformed node address", seed(&[(14, "    10.0.0.256:")]), Some(14), "node key `10.0.0.256` is not an IP address"),
        case("malformed join_address", seed(&[(2, "  join_address: 10.0.0")]), Some(2), "join_address: `10.0.0` is not an IPv4 or IPv6 address"),
        case("malformed gateway", seed(&[(4, "  default_gateway: 10.0.0.1.1")]), Some(4), "`10.0.0.1.1` is not an IPv4 or IPv6 address"),
        case("gateway outside the subnet", seed(&[(4, "  default_gateway: 10.0.1.1")]), Some(6), "default gateway 10.0.1.1 is outside node 10.0.0.3's subnet 10.0.0.0/24"),
        case("gateway of another family", seed(&[(4, "  default_gateway: \"fd00::1\"")]), Some(6), "default gateway fd00::1 and node address 10.0.0.3 are of different IP families"),
        case("interface with trailing space", seed(&[(8, "      interface: \"eth0 \"")]), Some(8), "interface `eth0 ` has trailing white space"),
        case("interface too long", seed(&[(12, "      interface: enp3s0f0np0vlan100")]), Some(12), "is 18 bytes long; Linux allows at most 15"),
        case("interface with a slash", seed(&[(16, "      interface: eth/0")]), Some(16), "contains `/`, which Linux refuses"),
        case("relative boot device", seed(&[(9, "      boot_device: nvme0n1")]), Some(9), "boot_device `nvme0n1` is not an absolute path; write the disk's device path, e.g. `/dev/nvme0n1`"),
        case("boot device outside /dev", seed(&[(13, "      boot_device: /tmp/disk.img")]), Some(13), "is not a device under /dev"),
        case("boot device with ..", seed(&[(17, "      boot_device: /dev/../etc/passwd")]), Some(17), "is not a plain device path"),
        case("GRUB without boot device", seed(&[(9, "")]), Some(6), "boots with GRUB but has no `boot_device`"),
        case("control character", seed(&[(8, "      interface: \"eth\\a0\"")]), Some(8), "contains the control character U+0007"),
        case("line break in a value", seed(&[(7, "      initiator: true\n      hostname: \"a\\nb\"")]), Some(8), "contains a line break"),
        case("hostname with a domain", seed(&[(7, "      initiator: true\n      hostname: node1.example.com")]), Some(8), "hostname `node1.example.com` contains a dot"),
        case("hostname NixOS refuses", seed(&[(7, "      initiator: true\n      hostname: -node")]), Some(8), "hostname `-node` is not one NixOS accepts"),
        case("two nodes, one hostname", seed(&[(11, "      hostname: twin"), (15, "      hostname: twin")]), Some(15), "hostname `twin` is also node 10.0.0.4 (line 10)'s"),
        case("rollout beyond etcd quorum", format!("{SEED}  rollout:\n    max_unavailable: 2\n"), Some(19), "max_unavailable: 2 could take 2 of 3 servers down at once; etcd needs 2 of 3 up, so at most 1"),
        case("alias expansion bomb", bomb, None, "anchors and aliases expand beyond a sane size"),
        case("file over the size bound", big, None, "inventories larger than 16777216 bytes are refused"),
        case("join address unreachable", seed(&[(2, "  join_address: 192.168.1.10")]), Some(2), "join_address 192.168.1.10 is neither a node nor inside any server's subnet"),
        case("no token at all", seed(&[(3, "")]), Some(1), "missing `join_token` (or `join_token_file`"),
        case("misspelt role", seed(&[(13, "      boot_device: /dev/sda\n      role: sever")]), Some(14), "`sever` is not one of server, agent (did you mean `server`?)"),
        case("agent as initiator", seed(&[(7, "      initiator: true\n      role: agent")]), Some(7), "has role agent and cannot be the initiator"),
        case("join address on an agent", seed(&[(7, "      initiator: false\n      role: agent")]), Some(2), "join_address 10.0.0.3 is node 10.0.0.3, which has role agent"),
        case("unquoted state_version", format!("{SEED}  state_version: 24.10\n"), Some(18), "expected text, found the number 24.1; quote it"),
        case("prefix length too long", seed(&[(4, "  default_gateway: 10.0.0.1\n  prefix_length: 33")]), Some(7), "prefix length 33 is too long for 10.0.0.3; at most 32"),
        case("malformed uuid", seed(&[(9, "      boot_device: /dev/sda\n      uuid: 1234")]), Some(10), "`1234` is not a UUID"),
        case("unknown reboot policy", format!("{SEED}  rollout:\n    reboot: sometimes\n"), Some(19), "`sometimes` is not one of always, when-needed"),
        case("malformed duration", format!("{SEED}  rollout:\n    drain_timeout: ten minutes\n"), Some(19), "`ten minutes` is not a duration"),
        case("health check with two probes", format!("{SEED}  rollout:\n    health_checks:\n      - name: both\n        http: http://x\n        command: [true]\n"), Some(20), "exactly one of `command`"),
        case("not an ssh key", format!("{SEED}  ssh_authorized_keys: [\"hunter2\"]\n"), Some(18), "not an OpenSSH public key"),
        case("token on the k3s command line", format!("{SEED}  k3s_extra_flags: [--token=abc]\n"), Some(18), "passes a token on the command line"),
        case("template outside the repository", format!("{SEED}  template: ../../etc/passwd\n"), Some(18), "must be a relative path inside the repository"),
        case("flat-layout host variable that looks misspelt", flat("  10.0.0.3:\n    boot_device: /dev/sda\n    interfase: eth0\n"), Some(7), "`interfase` looks like a misspelling of `interface`"),
        case("node that is a list", seed(&[(14, "    10.0.0.5: [eth0]"), (15, ""), (16, ""), (17, "")]), Some(14), "expected a mapping of keys, found a list"),
        case("no nodes", "cluster:\n  join_address: 10.0.0.3\n  join_token: t\n  nodes: {}\n".into(), Some(4), "no nodes; list at least one node"),
        case("server flag in k3s_extra_flags reaching an agent", format!("{}  k3s_extra_flags: [--disable=traefik]\n", seed(&[(15, "      initiator: false\n      role: agent")])), Some(19), "`--disable` is a k3s server flag; k3s_extra_flags go to every node, agent 10.0.0.5 too"),
        case("server flag in k3s_agent_flags", format!("{SEED}  k3s_agent_flags:\n    - --node-label=pool=a\n    - --cluster-cidr=10.50.0.0/16\n"), Some(20), "`--cluster-cidr` is a k3s server flag; k3s_agent_flags go to agent-role nodes"),
        case("server flag on an agent node", seed(&[(15, "      role: agent\n      k3s_extra_flags: [--write-kubeconfig-mode=0644]")]), Some(16), "`--write-kubeconfig-mode` is a k3s server flag, and node 10.0.0.5 has role agent"),
        case("IPv6 nodes on k3s's default IPv4 pod network", "join_address: \"fd00::3\"\njoin_token: t\ndefault_gateway: \"fd00::1\"\nnodes:\n  \"fd00::3\": {initiator: true, interface: e, boot_device: /dev/sda}\n".into(), Some(5), "node fd00::3 has only IPv6 addresses but the pod network (--cluster-cidr, default 10.42.0.0/16) is IPv4"),
        case("pod and service networks of different families", "join_address: \"fd00::3\"\njoin_token: t\ndefault_gateway: \"fd00::1\"\nk3s_server_flags: [--cluster-cidr=fd00:42::/56]\nnodes:\n  \"fd00::3\": {initiator: true, interface: e, boot_device: /dev/sda}\n".into(), Some(5), "the pod network (--cluster-cidr) is IPv6 but the service network (--service-cidr) IPv4"),
        case("dual-stack pods, a node of one family", format!("{SEED}  k3s_server_flags: [\"--cluster-cidr=10.42.0.0/16,fd00:42::/56\", \"--service-cidr=10.43.0.0/16,fd00:43::/112\"]\n"), Some(6), "the cluster is dual-stack (--cluster-cidr has IPv4 and IPv6) but node 10.0.0.3 has only an IPv4 address"),
        case("IPv4 resolver on an IPv6-only cluster", "join_address: \"fd00::3\"\njoin_token: t\ndefault_gateway: \"fd00::1\"\nnameservers: [1.1.1.1]\nk3s_server_flags: [--cluster-cidr=fd00:42::/56, --service-cidr=fd00:43::/112]\nnodes:\n  \"fd00::3\": {initiator: true, interface: e, boot_device: /dev/sda}\n".into(), Some(4), "nameserver 1.1.1.1 is IPv4 but no node has an IPv4 address"),
        case("malformed pod network", format!("{SEED}  k3s_server_flags: [--cluster-cidr=10.42.0.0]\n"), Some(6), "`10.42.0.0` is not a CIDR"),
        case("secondary address of the same family", seed(&[(9, "      boot_device: /dev/sda\n      secondary_ip: 10.0.0.33")]), Some(10), "secondary_ip 10.0.0.33 is of the same IP family as node 10.0.0.3"),
        case("secondary gateway without an address", seed(&[(9, "      boot_device: /dev/sda\n      secondary_gateway: \"fd00::1\"")]), Some(10), "`secondary_gateway` without `secondary_ip`"),
        case("unknown boot loader", seed(&[(9, "      boot_loader: lilo")]), Some(9), "`lilo` is not one of grub, grub-efi, systemd-boot"),
        case("the same address as IPv4 and IPv4-mapped IPv6", seed(&[(14, "    \"::ffff:10.0.0.3\":")]), Some(14), "node ::ffff:10.0.0.3 is the same address as node 10.0.0.3"),
        case("hostnames differing only in case", seed(&[(11, "      hostname: web"), (15, "      hostname: web1")]).replace("hostname: web1", "hostname: WEB"), Some(15), "hostname `WEB` is also node 10.0.0.4 (line 10)'s"),
        case("upper-case hostname", seed(&[(11, "      hostname: Web-1")]), Some(11), "hostname `Web-1` is not a Kubernetes node name"),
        case("loopback node", seed(&[(14, "    127.0.0.5:")]), Some(14), "node 127.0.0.5 is a loopback, unspecified or multicast address"),
        case("loopback join address", seed(&[(2, "  join_address: \"::1\"")]), Some(2), "join_address ::1 is a loopback"),
        case("a number written in hex where text is expected", seed(&[(8, "      interface: 0x1F")]), Some(8), "YAML reads this as the number 31, not as the text written"),
        case("a number with a plus sign as the token", seed(&[(3, "  join_token: +12")]), Some(3), "YAML reads this as the number, not as the text written"),
        case("a YAML tag", seed(&[(8, "      interface: !!str eth0")]), Some(8), "YAML tags such as `!!str` are not supported"),
        case("a local YAML tag", seed(&[(3, "  join_token: !secret abc")]), Some(3), "YAML tags such as `!secret` are not supported"),
        case("aliases standing for a large text", format!("{}  vars:\n    big: &big [{}]\n    copies: [{}]\n", SEED, vec!["\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\""; 8000].join(", "), vec!["*big"; 200].join(", ")), None, "could expand beyond a sane size"),
        case("an endless duration", format!("{SEED}  rollout:\n    health_timeout: 100000000y\n"), Some(19), "is longer than nk3 waits for anything; at most 366 days"),
        case("an endless duration in seconds", format!("{SEED}  rollout:\n    drain_timeout: 9223372036854775807\n"), Some(19), "is longer than nk3 waits for anything"),
        case("a datastore password in a flag", format!("{SEED}  k3s_server_flags: [\"--datastore-endpoint=postgres://k3s:pa55w0rd@db:5432/k3s\"]\n"), Some(18), "`--datastore-endpoint` would carry a secret in the rendered configuration"),
        case("an S3 secret key in a flag", format!("{SEED}  k3s_server_flags: [--etcd-s3-secret-key=S3CR3T]\n"), Some(18), "`--etcd-s3-secret-key` would carry a secret"),
        case("empty file", "# nothing yet\n".into(), None, "the file is empty"),
        case("not YAML", "cluster: [\n  join_address: 10.0.0.3\n".into(), Some(3), "not valid YAML"),
    ]
}

#[test]
fn every_bad_inventory_is_refused_with_its_line_and_a_message() {
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in &cases {
        let diags = match inventory::load("inventory.yaml", &c.text) {
            Ok(_) => {
                failures.push(format!("{}: accepted", c.what));
                continue;
            }
            Err(d) => d,
        };
        let prefix = match c.line {
            Some(l) => format!("inventory.yaml:{l}: "),
            None => "inventory.yaml: ".to_string(),
        };
        let lines = diags.lines();
        if !lines
            .iter()
            .any(|l| l.starts_with(&prefix) && l.contains(c.message))
        {
            failures.push(format!(
                "{}: expected `{prefix}…{}…`, got:\n    {}",
                c.what,
                c.message,
                lines.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn the_valid_seed_is_accepted() {
    let inv = inventory::load("inventory.yaml", SEED).unwrap();
    assert_eq!(inv.nodes.len(), 3);
}

#[test]
fn all_problems_are_reported_in_one_run() {
    let text = seed(&[
        (2, "  join_address: 10.0.0"),
        (8, "      interfce: eth0"),
        (11, "      initiator: true"),
        (17, "      boot_device: sda"),
    ]);
    let lines = errors(&text).lines();
    for want in [
        ":2: cluster.join_address",
        ":8: cluster.nodes.10.0.0.3.interfce",
        ":17: cluster.nodes.10.0.0.5.boot_device",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "missing {want} in {lines:#?}"
        );
    }
}

#[test]
fn a_missing_nodes_key_is_reported_once() {
    let lines = errors("cluster:\n  join_address: 10.0.0.3\n  join_token: t\n").lines();
    assert_eq!(lines, ["inventory.yaml:1: cluster: missing `nodes`: a mapping from each node's IP address to its settings"]);
}

#[test]
fn a_token_given_as_a_k3s_flag_is_refused_without_quoting_it() {
    for flags in [
        "[--token=s3cret-value]",
        "[\"--token=s3cret value\"]",
        "[s3cret-value]",
        "[\"--datastore-endpoint=mysql://u:s3cret@tcp(db)/k3s\"]",
        "[--vpn-auth=name=tailscale,joinKey=s3cret]",
    ] {
        let text = format!("{SEED}  k3s_extra_flags: {flags}\n");
        let all = errors(&text).to_string();
        assert!(all.contains("inventory.yaml:18: "), "{all}");
        assert!(!all.contains("s3cret"), "{all}");
    }
}

#[test]
fn the_token_is_never_quoted_back() {
    let text = seed(&[(3, "  join_token: \"s3cret value\"")]);
    let all = errors(&text).to_string();
    assert!(
        all.contains("inventory.yaml:3: cluster.join_token: the join token contains white space"),
        "{all}"
    );
    assert!(!all.contains("s3cret"), "{all}");
}
