//! Golden files: every example node's configuration.nix, reviewed like code.
//! `UPDATE_GOLDEN=1` rewrites them after an intended change; review the diff before committing.

use crate::support::{render_all, root, EXAMPLES};

#[test]
fn every_example_node_matches_its_golden_file() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for ex in EXAMPLES {
        let dir = root().join("tests/golden").join(ex.name);
        let (_tmp, files) = render_all(ex);
        if update {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        for (name, text) in &files {
            let path = dir.join(name);
            if update {
                std::fs::write(&path, text).unwrap();
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(golden) if &golden == text => {}
                Ok(_) => mismatches.push(format!(
                    "{} differs from what `render` prints now",
                    path.display()
                )),
                Err(_) => mismatches.push(format!("{} is missing", path.display())),
            }
        }
        let expected: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        for e in std::fs::read_dir(&dir).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            if !expected.contains(&n.as_str()) {
                mismatches.push(format!(
                    "{} belongs to no node any more",
                    dir.join(n).display()
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "golden files out of date (UPDATE_GOLDEN=1 rewrites them):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn seed_example_nodes_keep_the_original_tools_names() {
    let (_tmp, files) = render_all(&EXAMPLES[0]);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    // uuid.uuid5(uuid.NAMESPACE_OID, ip) for each node, as the original tool named them.
    assert_eq!(
        names,
        [
            "a9bcde5e-240d-54ad-8590-d8e18b7ee42f.nix",
            "b0d1dcf2-588a-5740-b321-5c9ca8d6b9b0.nix",
            "d6c27852-4d1c-5830-8e94-40b76fa2b5ec.nix",
        ]
    );
}
