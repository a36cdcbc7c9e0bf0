//! Node names, derived exactly as the original nk3 tool derived them.

use uuid::Uuid;

/// The hostname of the node keyed `key` in the inventory: `UUIDv5(namespace OID, key)`,
/// lower-case. `key` is the address as written in the inventory, so an existing cluster keeps
/// its node names.
pub fn hostname_for(key: &str) -> String {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::hostname_for;

    #[test]
    fn matches_the_names_existing_clusters_have() {
        // Names the original tool gave (its README's output) and Python's uuid.uuid5 agrees.
        assert_eq!(
            hostname_for("172.30.190.198"),
            "d752cf78-d889-5bd9-8dd4-2bb7eeb898f4"
        );
        assert_eq!(
            hostname_for("172.30.190.3"),
            "d6c27852-4d1c-5830-8e94-40b76fa2b5ec"
        );
    }
}
