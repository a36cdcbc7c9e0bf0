//! The `rollout:` block: reboot policy, timeouts, the lease's shape, Ceph and the health
//! checks.

use super::super::{Ceph, HealthCheck, RebootPolicy, Rollout};
use super::*;

impl Reader<'_> {
    pub(super) fn rollout(&mut self, v: &Yaml, at: &Path) -> Option<Rollout> {
        let entries = self.mapping(v, at)?;
        let (f, _) = self.fields(entries, at, ROLLOUT_KEYS, false);
        let mut r = Rollout::default();
        if let Some(v) = f.get("reboot") {
            r.reboot = self.choice(
                v,
                &at.key("reboot"),
                &[
                    ("always", RebootPolicy::Always),
                    ("when-needed", RebootPolicy::WhenNeeded),
                ],
            )?;
        }
        if let Some(v) = f.get("max_unavailable") {
            r.max_unavailable = self.uint(v, &at.key("max_unavailable"), 1, 1000)? as u32;
        }
        for (key, slot) in [
            ("lease_duration", &mut r.lease_duration),
            ("drain_timeout", &mut r.drain_timeout),
            ("health_timeout", &mut r.health_timeout),
        ] {
            if let Some(v) = f.get(key) {
                *slot = self.duration(v, &at.key(key))?;
            }
        }
        if let Some(v) = f.get("ceph") {
            r.ceph = self.ceph(v, &at.key("ceph"));
        }
        if let Some(v) = f.get("upgrade_every") {
            r.upgrade_every = Some(self.duration(v, &at.key("upgrade_every"))?);
        }
        if r.lease_duration < MIN_LEASE {
            self.err(&at.key("lease_duration"), format!("a lease of {} is too short; it must cover a node's reboot (the default is 15m)", humantime::format_duration(r.lease_duration)));
        }
        if let Some(v) = f.get("health_checks") {
            r.health_checks = self.list(v, &at.key("health_checks"), |r, v, at| {
                r.health_check(v, at)
            });
        }
        Some(r)
    }

    pub(super) fn ceph(&mut self, v: &Yaml, at: &Path) -> Option<Ceph> {
        let entries = self.mapping(v, at)?;
        let (f, _) = self.fields(entries, at, CEPH_KEYS, false);
        let mut c = Ceph::default();
        if let Some(v) = f.get("namespace") {
            c.namespace = self.checked(v, &at.key("namespace"), check::nonempty)?;
        }
        if let Some(v) = f.get("deployment") {
            c.deployment = self.checked(v, &at.key("deployment"), check::nonempty)?;
        }
        if let Some(v) = f.get("tolerate") {
            c.tolerate = self.list(v, &at.key("tolerate"), |r, v, at| {
                r.checked(v, at, check::nonempty)
            });
        }
        Some(c)
    }

    pub(super) fn health_check(&mut self, v: &Yaml, at: &Path) -> Option<HealthCheck> {
        let entries = self.mapping(v, at)?;
        let (f, _) = self.fields(entries, at, CHECK_KEYS, false);
        let name = match f.get("name") {
            Some(v) => self.checked(v, &at.key("name"), check::nonempty)?,
            None => {
                self.err(at, "a health check needs a `name`");
                return None;
            }
        };
        match (f.get("command"), f.get("http")) {
            (Some(c), None) => {
                let argv = match c {
                    Yaml::Seq(_) => self.list(c, &at.key("command"), |r, v, at| {
                        r.checked(v, at, check::nonempty)
                    }),
                    _ => {
                        self.err(&at.key("command"), "write the command as a list of arguments (`command: [curl, -f, http://localhost]`); no shell is involved");
                        return None;
                    }
                };
                if argv.is_empty() {
                    self.err(&at.key("command"), "the command is empty");
                    return None;
                }
                Some(HealthCheck::Command { name, argv })
            }
            (None, Some(u)) => {
                let url = self.checked(u, &at.key("http"), check::http_url)?;
                Some(HealthCheck::Http { name, url })
            }
            _ => {
                self.err(at, "a health check has exactly one of `command` (a list of arguments) or `http` (a URL)");
                None
            }
        }
    }
}
