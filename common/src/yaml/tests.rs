//! Where the reader places each value, and what it refuses: duplicate keys, tags, alias
//! bombs, YAML numbers where a string was meant.

use super::*;

fn p(segs: &[&str]) -> Vec<Seg> {
    segs.iter()
        .map(|s| match s.parse::<usize>() {
            Ok(n) if s.len() < 3 => Seg::Index(n),
            _ => Seg::Key(s.to_string()),
        })
        .collect()
}

const DOC: &str = "---\ncluster:\n  join_address: 10.0.0.3\n  nodes:\n    10.0.0.3:\n      initiator: true\n      interface: eth0\n    10.0.0.4: { initiator: false, interface: eth1 }\n  rollout:\n    health_checks:\n      - name: a\n        command: [x]\n      - name: b\n        http: http://x\nwatch:\n- default\n- kube-system\n";

#[test]
fn locates_block_keys() {
    assert_eq!(locate(DOC, &p(&["cluster"])), Some(2));
    assert_eq!(locate(DOC, &p(&["cluster", "join_address"])), Some(3));
    assert_eq!(
        locate(DOC, &p(&["cluster", "nodes", "10.0.0.3", "interface"])),
        Some(7)
    );
}

#[test]
fn locates_flow_mapping_entries_on_their_line() {
    assert_eq!(
        locate(DOC, &p(&["cluster", "nodes", "10.0.0.4", "interface"])),
        Some(8)
    );
}

#[test]
fn locates_sequence_items_and_their_keys() {
    assert_eq!(
        locate(
            DOC,
            &p(&["cluster", "rollout", "health_checks", "1", "http"])
        ),
        Some(14)
    );
    assert_eq!(
        locate(
            DOC,
            &p(&["cluster", "rollout", "health_checks", "0", "name"])
        ),
        Some(11)
    );
    assert_eq!(locate(DOC, &p(&["watch", "1"])), Some(17));
}

#[test]
fn missing_key_falls_back_to_closest_ancestor() {
    assert_eq!(locate(DOC, &p(&["cluster", "nodes", "10.9.9.9"])), Some(4));
    assert_eq!(locate(DOC, &p(&["nope"])), None);
}

#[test]
fn duplicate_keys_are_refused_with_the_second_line() {
    let e = parse("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err();
    assert_eq!(e.line, Some(4));
    assert!(e.message.contains("duplicate key `c`"), "{}", e.message);
}

#[test]
fn tags_and_complex_keys_are_refused_with_their_place() {
    let e = parse("a:\n  b: !secret x\n").unwrap_err();
    assert_eq!(e.line, Some(2));
    assert!(
        e.message
            .starts_with("YAML tags such as `!secret` are not supported"),
        "{}",
        e.message
    );
    // Core-schema tags, which serde_yaml would apply silently, too; and none of text.
    for (text, line) in [
        ("a: !!str 12\n", 1),
        ("a:\n  - x\n  - !!binary aGk=\n", 3),
        ("a: [1, !!int 2]\n", 1),
    ] {
        assert_eq!(parse(text).unwrap_err().line, Some(line), "{text}");
    }
    for text in [
        "a: 'it!s'\n",
        "a: pass!word\n",
        "a: \"!!str\"\n",
        "a: x # !!str\n",
        "a: |\n  !!str is text here\nb: 1\n",
    ] {
        assert!(parse(text).is_ok(), "{text}");
    }
    let e = parse("? [x]\n: 1\n").unwrap_err();
    assert_eq!(e.message, "mapping keys must be plain text, found a list");
}

#[test]
fn alias_bombs_are_refused() {
    let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let prev = format!("*a{}", i - 1);
        doc.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 9].join(", ")));
    }
    let e = parse(&doc).unwrap_err();
    assert!(e.message.contains("anchors and aliases"), "{}", e.message);
}

#[test]
fn unquoted_versions_are_numbers_not_strings() {
    let v = parse("v: 24.10").unwrap();
    assert_eq!(v, Yaml::Map(vec![("v".into(), Yaml::Float("24.1".into()))]));
}
