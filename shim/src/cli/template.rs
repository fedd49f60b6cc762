//! `cocoon template create|list|rm`: the templates sandboxes are restored from (see
//! `cocoon_runtime::template`). `create` makes them on first use anyway; making one ahead
//! takes the boot off the first container's start.

use clap::{Args, Subcommand};

use cocoon_runtime::config::Config;
use cocoon_runtime::template::{DEFAULT_SLOTS, MAX_SLOTS, Template, TemplateSpec, Templates};

use crate::error::CliError;

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Boot a VM and save it as the template for VMs of this size (replacing one that exists).
    Create(CreateTemplateArgs),
    /// List the templates.
    List {
        #[arg(short, long, default_value = "table", value_name = "table|json")]
        format: String,
    },
    /// Remove templates (running sandboxes restored from one are not affected).
    Rm {
        /// Remove every template.
        #[arg(short, long, conflicts_with = "names")]
        all: bool,
        names: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct CreateTemplateArgs {
    /// vCPUs (default: the configuration's default_cpus).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Guest memory in MiB (default: the configuration's default_memory_mib).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Disks the template has room for.
    #[arg(long, default_value_t = DEFAULT_SLOTS)]
    pub slots: usize,
    /// NICs the template has (for containers whose network namespace has that many
    /// interfaces).
    #[arg(long, default_value_t = 1)]
    pub nics: usize,
}

pub fn template(command: &TemplateCommand) -> Result<(), CliError> {
    let config = Config::load()?;
    let templates = Templates::new(&config.template_dir);
    match command {
        TemplateCommand::Create(args) => {
            if !(1..=MAX_SLOTS).contains(&args.slots) {
                return Err(CliError::Other(format!(
                    "--slots {}: a template has 1 to {MAX_SLOTS} disk slots",
                    args.slots
                )));
            }
            if !(1..=4).contains(&args.nics) || args.slots + args.nics > MAX_SLOTS + 1 {
                return Err(CliError::Other(format!(
                    "--nics {}: a template has 1 to 4 NICs, and at most {} disk slots and NICs",
                    args.nics,
                    MAX_SLOTS + 1
                )));
            }
            let spec = TemplateSpec {
                kernel: config.kernel.clone(),
                initrd: config.initrd.clone(),
                cpus: args.cpus.unwrap_or(config.default_cpus),
                memory_mib: args.memory.unwrap_or(config.default_memory_mib),
                slots: args.slots,
                nics: args.nics,
            };
            cocoon_vmm::jail::set_seccomp(config.seccomp);
            let template = templates.create(&spec, config.guest_limits())?;
            println!("{}", template.info.name);
            Ok(())
        }
        TemplateCommand::List { format } => list(&templates.list(), format),
        TemplateCommand::Rm { all, names } => {
            let names: Vec<String> = if *all {
                templates.list().into_iter().map(|t| t.info.name).collect()
            } else if names.is_empty() {
                return Err(CliError::Other("name a template, or --all".into()));
            } else {
                names.clone()
            };
            for name in names {
                templates.remove(&name)?;
            }
            Ok(())
        }
    }
}

fn list(templates: &[Template], format: &str) -> Result<(), CliError> {
    match format {
        "json" => {
            let infos: Vec<_> = templates.iter().map(|t| &t.info).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&infos).unwrap_or_default()
            );
        }
        "table" => {
            println!(
                "{:<16} {:>4} {:>10} {:>5} {:>4} {:>9} {:<32} KERNEL",
                "NAME", "CPUS", "MEMORY", "SLOTS", "NICS", "DISK", "CREATED"
            );
            for t in templates {
                let i = &t.info.inputs;
                println!(
                    "{:<16} {:>4} {:>6} MiB {:>5} {:>4} {:>5} MiB {:<32} {}",
                    t.info.name,
                    i.cpus,
                    i.memory_mib,
                    i.slots,
                    i.nics,
                    t.disk_usage() >> 20,
                    t.info.created,
                    i.kernel.path.display()
                );
            }
        }
        other => return Err(CliError::Other(format!("invalid format option {other:?}"))),
    }
    Ok(())
}
