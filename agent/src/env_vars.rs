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
/// The repository the agent follows.
pub const NK3_REPO: &str = "NK3_REPO";
/// The branch it follows.
pub const NK3_BRANCH: &str = "NK3_BRANCH";
/// The inventory's path inside the repository.
pub const NK3_INVENTORY_PATH: &str = "NK3_INVENTORY_PATH";
/// Time between polls of the repository.
pub const NK3_POLL_INTERVAL: &str = "NK3_POLL_INTERVAL";
/// Where configuration.nix lives.
pub const NK3_NIXOS_DIR: &str = "NK3_NIXOS_DIR";
/// The kubeconfig for the k3s API.
pub const NK3_KUBECONFIG: &str = "NK3_KUBECONFIG";
/// k3s's data directory: what k3s leaves there tells whether it joined a cluster here.
pub const NK3_K3S_DATA_DIR: &str = "NK3_K3S_DATA_DIR";
/// The namespace of the rollout Leases.
pub const NK3_LEASE_NAMESPACE: &str = "NK3_LEASE_NAMESPACE";
/// The name of the first rollout Lease.
pub const NK3_LEASE_NAME: &str = "NK3_LEASE_NAME";
/// `render`: the `system.stateVersion` for an inventory that sets none.
pub const NK3_STATE_VERSION: &str = "NK3_STATE_VERSION";
/// The longest a build may take.
pub const NK3_BUILD_TIMEOUT: &str = "NK3_BUILD_TIMEOUT";
/// The longest a switch, boot or rollback may take.
pub const NK3_SWITCH_TIMEOUT: &str = "NK3_SWITCH_TIMEOUT";
/// The nixos-rebuild command.
pub const NK3_NIXOS_REBUILD: &str = "NK3_NIXOS_REBUILD";
/// The systemctl command.
pub const NK3_SYSTEMCTL: &str = "NK3_SYSTEMCTL";
/// The nix-channel command.
pub const NK3_NIX_CHANNEL: &str = "NK3_NIX_CHANNEL";
/// The git command (used only to verify commit signatures).
pub const NK3_GIT: &str = "NK3_GIT";
/// The ssh program, for ssh:// repositories.
pub const NK3_SSH: &str = "NK3_SSH";
/// The running system's link.
pub const NK3_CURRENT_SYSTEM: &str = "NK3_CURRENT_SYSTEM";
/// The booted system's link.
pub const NK3_BOOTED_SYSTEM: &str = "NK3_BOOTED_SYSTEM";
/// The file that holds this boot's id.
pub const NK3_BOOT_ID_FILE: &str = "NK3_BOOT_ID_FILE";
/// SSH private key for the repository.
pub const NK3_SSH_KEY_FILE: &str = "NK3_SSH_KEY_FILE";
/// known_hosts file for the repository's SSH host.
pub const NK3_KNOWN_HOSTS: &str = "NK3_KNOWN_HOSTS";
/// File holding an HTTPS token for the repository.
pub const NK3_REPO_TOKEN_FILE: &str = "NK3_REPO_TOKEN_FILE";
/// SSH allowed-signers file: when set, only commits signed by these keys are applied.
pub const NK3_ALLOWED_SIGNERS: &str = "NK3_ALLOWED_SIGNERS";
/// GnuPG home whose keyring holds the keys allowed to sign commits.
pub const NK3_GPG_HOME: &str = "NK3_GPG_HOME";
/// Accept a branch that was rewritten (force-pushed).
pub const NK3_ALLOW_FORCE_PUSH: &str = "NK3_ALLOW_FORCE_PUSH";
/// Log verbosity.
pub const NK3_LOG_LEVEL: &str = "NK3_LOG_LEVEL";
/// How long git may wait on the repository.
pub const NK3_GIT_TIMEOUT: &str = "NK3_GIT_TIMEOUT";
/// Address of the Prometheus metrics endpoint; unset: no endpoint.
pub const NK3_METRICS_ADDRESS: &str = "NK3_METRICS_ADDRESS";
/// The kubectl command (Ceph check).
pub const NK3_KUBECTL: &str = "NK3_KUBECTL";
