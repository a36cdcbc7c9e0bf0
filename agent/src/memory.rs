//! What the idle daemon keeps resident. glibc's malloc gives each thread that allocates an
//! arena of its own and keeps what was freed in it; the agent's threads (the pass, the API
//! client's, the lease watch, the renewer) each come and go, and their arenas stay. One
//! arena for the whole process, and freed memory handed back to the system after each pass,
//! keep an idle agent small (README: Performance). Elsewhere (musl) nothing is done.

/// One malloc arena for every thread. Call before any other thread starts.
#[allow(unsafe_code)]
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator; main() calls this first,
    // before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Hands memory freed during a pass back to the system.
#[allow(unsafe_code)]
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only returns free pages to the kernel.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
