//! Every environment variable nk3-agent reads, in one place. Each flag that can be set from
//! the environment names its variable here.

/// Directory for the agent's state: git checkout, `state.json`, lock, token file.
pub const NK3_STATE_DIR: &str = "NK3_STATE_DIR";
/// Identity override: the node's IP address or hostname.
pub const NK3_NODE: &str = "NK3_NODE";
/// File holding the machine's SMBIOS product UUID.
pub const NK3_PRODUCT_UUID_FILE: &str = "NK3_PRODUCT_UUID_FILE";
/// The kernel's IPv4 routing table.
pub const NK3_ROUTE_TABLE: &str = "NK3_ROUTE_TABLE";
/// The kernel's IPv6 routing table.
pub const NK3_ROUTE6_TABLE: &str = "NK3_ROUTE6_TABLE";
