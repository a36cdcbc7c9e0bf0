//! Every environment variable nk3-agent reads, in one place. Each flag that can be set from
//! the environment names its variable here.

/// Directory for the agent's state: git checkout, `state.json`, lock, token file.
pub const NK3_STATE_DIR: &str = "NK3_STATE_DIR";
/// Identity override: the node's IP address or hostname.
pub const NK3_NODE: &str = "NK3_NODE";
