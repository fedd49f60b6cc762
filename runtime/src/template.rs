//! Templates: a snapshot of a booted VM whose agent is ready, which containers' sandboxes are
//! restored from instead of booting (a boot is 15-25 s of emulated guest kernel code here; a
//! restore is milliseconds). A template has spare disk slots (empty images, disks of 0 sectors)
//! into which a restore swaps the container's layers, and a virtio-fs device without shares,
//! to which the clone's monitor adds the container's bind mounts.
//!
//! One template per set of inputs: kernel, initramfs, vCPUs, memory, disk slots, the snapshot
//! format and the runtime binary itself. The inputs' hash names the template's directory, so a
//! changed input means another template, and the stale ones are removed when the next is made.
//!
//! ```text
//! DIR/NAME/template.json   what it was made from (written before the directory is renamed in)
//! DIR/NAME/vm/             the VM snapshot (state.bin, memory.bin)
//! DIR/NAME/slotN           the spare disk slots' empty images
//! DIR/NAME.lock            held while NAME is made or removed
//! DIR/.NAME.tmp-PID        a template being made (a crash leaves it; the next maker removes it)
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cocoon_agent_protocol::boot_check::Fnv1a64;
use cocoon_vmm::snapshot::FileIdentity;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::progress::GuestLimits;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::state::{lock_file, read_json, rfc3339, write_atomically};

/// The layout of a template directory; bump when it changes shape.
const LAYOUT_VERSION: u32 = 3;
const INFO_FILE: &str = "template.json";
const VM_DIR: &str = "vm";

/// Disk slots of the usual template: enough for images of a few layers.
pub const DEFAULT_SLOTS: usize = 8;
/// Disk slots of the template for containers with more: every virtio slot but the vsock's,
/// the file server's and one NIC's.
pub const MAX_SLOTS: usize = cocoon_vmm::arch::x86_64::layout::VIRTIO_MAX_DEVICES - 3;

/// What a template is made from; its hash names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    pub slots: usize,
    /// NICs, detached until a clone attaches its TAPs: at least one, so that containers with
    /// a network and without share the usual template.
    pub nics: usize,
}

impl TemplateSpec {
    /// The template for a sandbox of `config`'s size with room for its disks.
    pub fn for_sandbox(config: &SandboxConfig) -> Result<TemplateSpec, Error> {
        let slots = match config.disks.len() {
            n if n <= DEFAULT_SLOTS => DEFAULT_SLOTS,
            n if n <= MAX_SLOTS => MAX_SLOTS,
            n => {
                return Err(Error::Other(format!(
                    "{n} disks: a microVM has room for {MAX_SLOTS}"
                )));
            }
        };
        Ok(TemplateSpec {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            slots,
            nics: config.taps.len().max(1),
        })
    }

    /// The inputs as recorded in `template.json`, read from the files as they are now.
    fn inputs(&self) -> Result<Inputs, Error> {
        let identity = |path: &Path| FileIdentity::of(path).map_err(Error::io("read", path));
        let exe = std::env::current_exe().map_err(Error::io("find", "/proc/self/exe"))?;
        Ok(Inputs {
            layout: LAYOUT_VERSION,
            snapshot_format: cocoon_vmm::snapshot::format::FORMAT_VERSION,
            runtime: identity(&exe)?,
            kernel: identity(&self.kernel)?,
            initrd: identity(&self.initrd)?,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            slots: self.slots,
            nics: self.nics,
        })
    }
}

/// Everything that makes one template differ from another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub layout: u32,
    pub snapshot_format: u32,
    /// The runtime binary, which holds the VMM that saved the devices.
    pub runtime: FileIdentity,
    pub kernel: FileIdentity,
    pub initrd: FileIdentity,
    pub cpus: u8,
    pub memory_mib: u64,
    pub slots: usize,
    #[serde(default)]
    pub nics: usize,
}

impl Inputs {
    fn name(&self) -> String {
        let mut hash = Fnv1a64::default();
        // JSON of a struct with fixed field order: a stable encoding of the inputs.
        hash.update(&serde_json::to_vec(self).unwrap_or_default());
        format!("{:016x}", hash.finish())
    }

    /// Whether the files this template was made from are still what they were.
    fn current(&self) -> bool {
        let same = |id: &FileIdentity| {
            FileIdentity::of(&id.path)
                .is_ok_and(|now| now.len == id.len && now.modified_ns == id.modified_ns)
        };
        self.layout == LAYOUT_VERSION
            && self.snapshot_format == cocoon_vmm::snapshot::format::FORMAT_VERSION
            && same(&self.runtime)
            && same(&self.kernel)
            && same(&self.initrd)
    }
}

/// `template.json`: what `template list` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: String,
    pub inputs: Inputs,
    pub created: String,
    /// How long the boot to a ready agent took when the template was made.
    pub boot_ms: u64,
}

/// A complete template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub info: TemplateInfo,
}

impl Template {
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(VM_DIR)
    }

    /// The images of the spare disk slots, in the guest's order.
    pub fn slots(&self) -> Vec<PathBuf> {
        slot_paths(&self.dir, self.info.inputs.slots)
    }

    /// How many NICs the template's VM has.
    pub fn nics(&self) -> usize {
        self.info.inputs.nics
    }

    /// Bytes the template takes on disk (memory.bin is sparse).
    pub fn disk_usage(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for dir in [self.dir.clone(), self.snapshot_dir()] {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if let Ok(meta) = entry.metadata()
                    && meta.is_file()
                {
                    total += meta.blocks() * 512;
                }
            }
        }
        total
    }
}

fn slot_paths(dir: &Path, slots: usize) -> Vec<PathBuf> {
    (0..slots).map(|i| dir.join(format!("slot{i}"))).collect()
}

/// The templates directory.
#[derive(Debug, Clone)]
pub struct Templates {
    dir: PathBuf,
}

impl Templates {
    pub fn new(dir: &Path) -> Templates {
        Templates {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The template for `spec`, made first if there is none. Concurrent callers make it once:
    /// the first takes the lock and makes it, the others wait for the lock and find it.
    pub fn ensure(&self, spec: &TemplateSpec, limits: GuestLimits) -> Result<Template, Error> {
        let inputs = spec.inputs()?;
        let name = inputs.name();
        if let Some(template) = self.complete(&name) {
            return Ok(template);
        }
        let _lock = self.lock(&name)?;
        if let Some(template) = self.complete(&name) {
            return Ok(template);
        }
        self.make(spec, inputs, &name, limits)
    }

    /// Makes the template for `spec` anew, replacing one that exists.
    pub fn create(&self, spec: &TemplateSpec, limits: GuestLimits) -> Result<Template, Error> {
        let inputs = spec.inputs()?;
        let name = inputs.name();
        let _lock = self.lock(&name)?;
        self.remove_locked(&name)?;
        self.make(spec, inputs, &name, limits)
    }

    /// Every complete template, oldest first.
    pub fn list(&self) -> Vec<Template> {
        let mut templates: Vec<Template> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                self.complete(&name)
            })
            .collect();
        templates.sort_by(|a, b| a.info.created.cmp(&b.info.created));
        templates
    }

    /// Removes the template `name` (a template in use by running sandboxes stays mapped by
    /// them until they end).
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        if !valid_name(name) || !self.dir.join(name).is_dir() {
            return Err(Error::Other(format!("template {name} does not exist")));
        }
        let _lock = self.lock(name)?;
        self.remove_locked(name)?;
        let _ = std::fs::remove_file(self.lock_path(name));
        Ok(())
    }

    /// Removes a template that failed to load, so the next use makes it again.
    pub fn discard(&self, template: &Template, reason: &Error) {
        tracing::warn!(
            template = %template.info.name,
            "the template failed to load, removing it to be made again: {reason}"
        );
        if let Err(e) = self.remove(&template.info.name) {
            tracing::warn!("cannot remove template {}: {e}", template.info.name);
        }
    }

    fn complete(&self, name: &str) -> Option<Template> {
        if !valid_name(name) {
            return None;
        }
        let dir = self.dir.join(name);
        let info: TemplateInfo = read_json(&dir.join(INFO_FILE)).ok()?;
        (info.name == name).then_some(Template { dir, info })
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.lock"))
    }

    fn lock(&self, name: &str) -> Result<File, Error> {
        crate::state::private_shared_dir(&self.dir).map_err(Error::io("create", &self.dir))?;
        lock_file(&self.lock_path(name))
    }

    /// Moves the template out of the way first, so no reader finds it half removed.
    fn remove_locked(&self, name: &str) -> Result<(), Error> {
        let dir = self.dir.join(name);
        if !dir.exists() {
            return Ok(());
        }
        let doomed = self.dir.join(format!(".{name}.rm-{}", std::process::id()));
        std::fs::rename(&dir, &doomed).map_err(Error::io("remove", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(Error::io("remove", &doomed))
    }

    /// Boots a VM of `spec` with empty disk slots, waits for its agent, snapshots it into a
    /// temporary directory and renames that into place: a template directory is complete or
    /// absent. Called with the template's lock held.
    fn make(
        &self,
        spec: &TemplateSpec,
        inputs: Inputs,
        name: &str,
        limits: GuestLimits,
    ) -> Result<Template, Error> {
        self.remove_leftovers(name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = self.make_in(&tmp, spec, inputs, name, limits);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        let info = result?;
        let dir = self.dir.join(name);
        // Only a directory without its record can be in the way (a crash mid-removal).
        self.remove_locked(name)?;
        std::fs::rename(&tmp, &dir).map_err(Error::io("rename", &tmp))?;
        tracing::info!(template = name, boot_ms = info.boot_ms, "made a template");
        self.prune_stale(name);
        Ok(Template { dir, info })
    }

    fn make_in(
        &self,
        tmp: &Path,
        spec: &TemplateSpec,
        inputs: Inputs,
        name: &str,
        limits: GuestLimits,
    ) -> Result<TemplateInfo, Error> {
        std::fs::create_dir_all(tmp).map_err(Error::io("create", tmp))?;
        let slots = slot_paths(tmp, spec.slots);
        for slot in &slots {
            File::create(slot).map_err(Error::io("create", slot))?;
        }
        let started = Instant::now();
        let sandbox = Sandbox::boot(&SandboxConfig {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disks: slots,
            vsock_socket: tmp.join("vsock.sock"),
            limits,
            taps: Vec::new(),
            nic_slots: spec.nics,
        })?;
        let boot_ms = started.elapsed().as_millis() as u64;
        // The NICs, still without a host side, go out of sight (into a namespace of the
        // agent's) until a clone's network names them: a container without one sees loopback
        // only, in the guest's own namespace, with no namespace made per container.
        let saved = sandbox
            .configure_network(Default::default())
            .and_then(|()| sandbox.snapshot(&tmp.join(VM_DIR)));
        sandbox.stop();
        let _ = std::fs::remove_file(tmp.join("vsock.sock"));
        saved?;
        let info = TemplateInfo {
            name: name.to_owned(),
            inputs,
            created: rfc3339(std::time::SystemTime::now()),
            boot_ms,
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|source| Error::Encode {
            what: "the template's record",
            source,
        })?;
        write_atomically(&tmp.join(INFO_FILE), &json)?;
        Ok(info)
    }

    /// What a maker that crashed left of `name`, and removals that did not finish.
    fn remove_leftovers(&self, name: &str) {
        let prefixes = [format!(".{name}.tmp-"), format!(".{name}.rm-")];
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if prefixes.iter().any(|p| file.starts_with(p.as_str())) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Removes the templates whose boot files or runtime changed since they were made: nothing
    /// can load them any more.
    fn prune_stale(&self, keep: &str) {
        for template in self.list() {
            if template.info.name != keep && !template.info.inputs.current() {
                tracing::info!(template = %template.info.name, "removing a stale template");
                let _ = self.remove(&template.info.name);
            }
        }
    }
}

/// 16 hex digits, as [`Inputs::name`] makes them: nothing that could walk out of the directory.
fn valid_name(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        let file = |path: &str| FileIdentity {
            path: path.into(),
            len: 10,
            modified_ns: 5,
        };
        Inputs {
            layout: LAYOUT_VERSION,
            snapshot_format: 1,
            runtime: file("/bin/cocoon"),
            kernel: file("/k"),
            initrd: file("/i"),
            cpus: 1,
            memory_mib: 256,
            slots: DEFAULT_SLOTS,
            nics: 1,
        }
    }

    #[test]
    fn every_input_changes_the_name() {
        let base = inputs().name();
        assert!(valid_name(&base), "{base}");
        let mut changed = Vec::new();
        let mut i = inputs();
        i.cpus = 2;
        changed.push(i);
        let mut i = inputs();
        i.memory_mib = 512;
        changed.push(i);
        let mut i = inputs();
        i.slots = MAX_SLOTS;
        changed.push(i);
        let mut i = inputs();
        i.nics = 2;
        changed.push(i);
        let mut i = inputs();
        i.kernel.modified_ns = 6;
        changed.push(i);
        let mut i = inputs();
        i.initrd.len = 11;
        changed.push(i);
        let mut i = inputs();
        i.runtime.modified_ns = 1;
        changed.push(i);
        let mut i = inputs();
        i.snapshot_format = 2;
        changed.push(i);
        for i in changed {
            assert_ne!(i.name(), base, "{i:?}");
        }
        assert_eq!(inputs().name(), base);
    }

    #[test]
    fn names_cannot_walk_out() {
        for bad in ["../../etc", "0123456789abcdeg", "", "0123456789abcdef/"] {
            assert!(!valid_name(bad), "{bad}");
        }
        let templates = Templates::new(Path::new("/nonexistent"));
        assert!(templates.remove("../x").is_err());
    }

    #[test]
    fn slots_are_chosen_by_the_disks_needed() {
        let config = |n: usize| SandboxConfig {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cpus: 1,
            memory_mib: 256,
            disks: vec![PathBuf::from("/d"); n],
            vsock_socket: "/s".into(),
            limits: GuestLimits::default(),
            taps: Vec::new(),
            nic_slots: 0,
        };
        assert_eq!(
            TemplateSpec::for_sandbox(&config(0)).unwrap().slots,
            DEFAULT_SLOTS
        );
        assert_eq!(
            TemplateSpec::for_sandbox(&config(8)).unwrap().slots,
            DEFAULT_SLOTS
        );
        assert_eq!(
            TemplateSpec::for_sandbox(&config(9)).unwrap().slots,
            MAX_SLOTS
        );
        assert!(TemplateSpec::for_sandbox(&config(MAX_SLOTS + 1)).is_err());
    }

    #[test]
    fn a_half_made_template_is_not_found_and_is_cleaned_up() {
        let dir = std::env::temp_dir().join(format!("cocoon-tpl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let templates = Templates::new(&dir);
        let name = inputs().name();
        // A crash mid-make: the temporary directory, without the final name.
        let tmp = dir.join(format!(".{name}.tmp-1"));
        std::fs::create_dir_all(tmp.join(VM_DIR)).unwrap();
        // A final directory without its record (cannot happen by rename, but must not count).
        std::fs::create_dir_all(dir.join(&name)).unwrap();
        assert!(templates.complete(&name).is_none());
        assert!(templates.list().is_empty());
        templates.remove_leftovers(&name);
        assert!(!tmp.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
