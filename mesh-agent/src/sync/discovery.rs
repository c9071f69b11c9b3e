//! Finds a pod's network namespace and cgroup on the node from its UID, by
//! scanning `/proc`: a process whose cgroup path carries the pod UID belongs
//! to the pod, and its `/proc/<pid>/ns/net` is the pod's network namespace.
//!
//! Both kubelet cgroup drivers name the pod's cgroup after its UID:
//!
//! | driver | pod cgroup component |
//! |---|---|
//! | cgroupfs | `pod1b4e28ba-2fa1-11d2-883f-0016d3cca427` |
//! | systemd | `kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice` |
//!
//! Among the pod's processes the one started first is taken (normally the
//! sandbox's `pause`, which holds the netns for the pod's whole life, so a
//! restarting app container does not change the path); once chosen, a
//! process is kept while it lives in the pod's cgroup. A new choice (the
//! sandbox was re-created) gives a new path, which re-enrolls the pod.
//!
//! The root is configurable (`--proc-root`): `/host/proc` in the DaemonSet
//! (the host's `/proc` mounted into the agent's container), a fake tree in
//! tests. Reading `/proc/<pid>/cgroup` needs no privilege; opening another
//! user's `/proc/<pid>/ns/net` needs `CAP_SYS_PTRACE`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

/// Where a pod lives on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLocation {
    /// The process whose namespace is used.
    pub pid: u32,
    /// `<proc root>/<pid>/ns/net`: the pod's network namespace.
    pub netns: PathBuf,
    /// The pod's cgroup directory: `<cgroup root>/<path up to the pod component>`.
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
struct Chosen {
    location: PodLocation,
    /// The pod's cgroup path relative to the cgroup root, as `/proc` shows it.
    rel_cgroup: String,
}

/// Pod UID → location discovery over a `/proc` tree, remembering its choices.
#[derive(Debug)]
pub struct Discovery {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    chosen: HashMap<String, Chosen>,
}

impl Discovery {
    /// Discovery over `proc_root` (`/proc`, `/host/proc`, …); cgroup paths are
    /// reported below `cgroup_root` (the host's cgroup2 mount as the agent sees it).
    pub fn new(proc_root: impl Into<PathBuf>, cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            cgroup_root: cgroup_root.into(),
            chosen: HashMap::new(),
        }
    }

    /// The `/proc` root scanned.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Locates each pod of `uids` (Kubernetes UIDs, dash form). Pods with no
    /// live process yet are absent from the result. Keeps a previous choice
    /// while its process still lives in the pod's cgroup; scans the whole
    /// tree only when some pod has no valid choice. Forgets pods not asked for.
    pub fn locate(&mut self, uids: &BTreeSet<String>) -> BTreeMap<String, PodLocation> {
        self.chosen.retain(|uid, _| uids.contains(uid));
        let mut missing: BTreeSet<&str> = BTreeSet::new();
        for uid in uids {
            let still_valid = self.chosen.get(uid).is_some_and(|c| {
                let pid_dir = self.proc_root.join(c.location.pid.to_string());
                is_alive(&pid_dir)
                    && process_cgroups(&pid_dir)
                        .iter()
                        .any(|path| pod_component(path, uid).as_deref() == Some(&c.rel_cgroup))
            });
            if !still_valid {
                self.chosen.remove(uid);
                missing.insert(uid);
            }
        }
        if !missing.is_empty() {
            self.scan(&missing);
        }
        uids.iter()
            .filter_map(|uid| {
                self.chosen
                    .get(uid)
                    .map(|c| (uid.clone(), c.location.clone()))
            })
            .collect()
    }

    fn scan(&mut self, missing: &BTreeSet<&str>) {
        let Ok(entries) = fs::read_dir(&self.proc_root) else {
            return;
        };
        // uid -> (start time, pid, relative pod cgroup)
        let mut best: HashMap<&str, (u64, u32, String)> = HashMap::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let pid_dir = entry.path();
            let cgroups = process_cgroups(&pid_dir);
            for uid in missing {
                let Some(rel) = cgroups.iter().find_map(|path| pod_component(path, uid)) else {
                    continue;
                };
                if !is_alive(&pid_dir) {
                    break;
                }
                let start = start_time(&pid_dir).unwrap_or(u64::MAX);
                let candidate = (start, pid, rel);
                match best.get(uid) {
                    Some(b) if (b.0, b.1) <= (candidate.0, candidate.1) => {}
                    _ => {
                        best.insert(uid, candidate);
                    }
                }
                break;
            }
        }
        for (uid, (_, pid, rel)) in best {
            let location = PodLocation {
                pid,
                netns: self.proc_root.join(pid.to_string()).join("ns/net"),
                cgroup: self.cgroup_root.join(rel.trim_start_matches('/')),
            };
            self.chosen.insert(
                uid.to_owned(),
                Chosen {
                    location,
                    rel_cgroup: rel,
                },
            );
        }
    }
}

/// The cgroup paths of a process (`/proc/<pid>/cgroup`): the cgroup2 line
/// (`0::/path`) when there is one, else every v1 hierarchy's path. Leading
/// `/..` components (a reader in another cgroup namespace) are dropped.
fn process_cgroups(pid_dir: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(pid_dir.join("cgroup")) else {
        return Vec::new();
    };
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mut path = path;
        while let Some(rest) = path.strip_prefix("/..") {
            path = rest;
        }
        if id == "0" {
            v2.push(path.to_owned());
        } else {
            v1.push(path.to_owned());
        }
    }
    if v2.is_empty() { v1 } else { v2 }
}

/// If a component of the cgroup `path` names pod `uid`, the path up to and
/// including that component.
fn pod_component(path: &str, uid: &str) -> Option<String> {
    let mut end = 0;
    for component in path.split('/') {
        end += component.len() + 1;
        if component_names_pod(component, uid) {
            return Some(path[..end.saturating_sub(1).min(path.len())].to_owned());
        }
    }
    None
}

/// `pod<uid>` (cgroupfs), or `…-pod<uid with _>.slice` (systemd), either
/// spelling of the UID in either form.
fn component_names_pod(component: &str, uid: &str) -> bool {
    let c = component.strip_suffix(".slice").unwrap_or(component);
    let Some(idx) = c.rfind("pod") else {
        return false;
    };
    if idx > 0 && !c[..idx].ends_with('-') {
        return false;
    }
    let found = &c[idx + 3..];
    found.len() == uid.len()
        && found
            .bytes()
            .zip(uid.bytes())
            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

/// A process that can hold a namespace: it exists and is not a zombie.
fn is_alive(pid_dir: &Path) -> bool {
    if fs::symlink_metadata(pid_dir.join("ns/net")).is_err() {
        return false;
    }
    match fs::read_to_string(pid_dir.join("stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|f| f.first() != Some(&"Z")),
        // No stat (a minimal fake tree): the namespace link is enough.
        Err(_) => true,
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn start_time(pid_dir: &Path) -> Option<u64> {
    let stat = fs::read_to_string(pid_dir.join("stat")).ok()?;
    // Fields after the command name: state is field 3, starttime field 22.
    stat_fields(&stat)?.get(22 - 3)?.parse().ok()
}

/// The fields of a `stat` line after `(comm)`, which may contain spaces.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID_B: &str = "6c0a8f5e-0000-4000-8000-00000000000b";

    struct FakeProc {
        root: PathBuf,
    }

    impl FakeProc {
        fn new(tag: &str) -> Self {
            let root = std::env::temp_dir().join(format!(
                "mesh-discovery-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).expect("fake proc root");
            Self { root }
        }

        fn process(&self, pid: u32, start: u64, state: &str, cgroup: &str) {
            let dir = self.root.join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).expect("pid dir");
            fs::write(dir.join("ns/net"), "").expect("ns/net");
            fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
            let mut stat = format!("{pid} (my app) {state}");
            for field in 4..=21 {
                stat.push_str(&format!(" {field}"));
            }
            stat.push_str(&format!(" {start} 0 0\n"));
            fs::write(dir.join("stat"), stat).expect("stat");
        }

        fn kill(&self, pid: u32) {
            fs::remove_dir_all(self.root.join(pid.to_string())).expect("remove pid");
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn uids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn component_forms() {
        assert!(component_names_pod(&format!("pod{UID_A}"), UID_A));
        let systemd = format!("kubepods-burstable-pod{}.slice", UID_A.replace('-', "_"));
        assert!(component_names_pod(&systemd, UID_A));
        assert!(component_names_pod(
            &format!("kubepods-pod{}.slice", UID_A.replace('-', "_")),
            UID_A
        ));
        assert!(!component_names_pod(&format!("pod{UID_B}"), UID_A));
        assert!(!component_names_pod(&format!("xpod{UID_A}"), UID_A));
        assert!(!component_names_pod(&format!("pod{UID_A}0"), UID_A));
        assert!(!component_names_pod("kubepods.slice", UID_A));
    }

    #[test]
    fn finds_both_driver_layouts_and_prefers_the_oldest_process() {
        let fake = FakeProc::new("layouts");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-abc.scope\n",
            UID_A.replace('-', "_")
        );
        fake.process(300, 900, "S", &systemd); // app, started later
        fake.process(200, 100, "S", &systemd); // pause
        fake.process(
            400,
            50,
            "S",
            &format!("12:memory:/kubepods/besteffort/pod{UID_B}/123\n0::/../../kubepods/besteffort/pod{UID_B}/123\n"),
        );
        fake.process(500, 1, "S", "0::/system.slice/sshd.service\n");
        let mut d = Discovery::new(&fake.root, "/sys/fs/cgroup");
        let found = d.locate(&uids(&[
            UID_A,
            UID_B,
            "00000000-0000-0000-0000-00000000dead",
        ]));
        assert_eq!(found.len(), 2, "{found:?}");
        let a = &found[UID_A];
        assert_eq!(a.pid, 200);
        assert_eq!(a.netns, fake.root.join("200/ns/net"));
        assert_eq!(
            a.cgroup,
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                UID_A.replace('-', "_")
            ))
        );
        let b = &found[UID_B];
        assert_eq!(b.pid, 400);
        assert_eq!(
            b.cgroup,
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID_B}"))
        );
    }

    #[test]
    fn keeps_its_choice_skips_zombies_and_refinds_after_the_process_dies() {
        let fake = FakeProc::new("refind");
        let cg = format!("0::/kubepods/pod{UID_A}/c1\n");
        fake.process(10, 5, "Z", &cg); // zombie: no usable namespace
        let mut d = Discovery::new(&fake.root, "/cg");
        assert!(d.locate(&uids(&[UID_A])).is_empty(), "only a zombie");
        fake.process(20, 10, "S", &cg);
        assert_eq!(d.locate(&uids(&[UID_A]))[UID_A].pid, 20);
        // An older-looking process appearing later does not move the choice.
        fake.process(30, 1, "S", &cg);
        assert_eq!(d.locate(&uids(&[UID_A]))[UID_A].pid, 20);
        // The chosen process dies: the next one is found.
        fake.kill(20);
        assert_eq!(d.locate(&uids(&[UID_A]))[UID_A].pid, 30);
        // Its pid is reused by a process of another cgroup: not the pod any more.
        fake.kill(30);
        fake.process(30, 99, "S", "0::/system.slice/cron.service\n");
        assert!(d.locate(&uids(&[UID_A])).is_empty());
        // A pod no longer asked for is forgotten.
        fake.process(40, 7, "S", &cg);
        assert_eq!(d.locate(&uids(&[UID_A]))[UID_A].pid, 40);
        assert!(d.locate(&uids(&[])).is_empty());
        assert!(d.chosen.is_empty());
    }

    #[test]
    fn a_missing_root_finds_nothing() {
        let mut d = Discovery::new("/nonexistent/proc", "/cg");
        assert!(d.locate(&uids(&[UID_A])).is_empty());
    }

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let stat = "42 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 0";
        let f = stat_fields(stat).expect("fields");
        assert_eq!(f[0], "S");
        assert_eq!(f[22 - 3], "777");
    }
}
