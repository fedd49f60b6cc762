//! `cocoon list`: every container under `--root`.

use super::Global;
use crate::cli::state::state_json;
use crate::error::CliError;

pub fn list(global: &Global, format: &str, quiet: bool) -> Result<(), CliError> {
    let states: Vec<serde_json::Value> = crate::state::list(&global.root)
        .iter()
        .map(|(dir, record)| state_json(dir, record))
        .collect();
    if quiet {
        for state in &states {
            println!("{}", state["id"].as_str().unwrap_or_default());
        }
        return Ok(());
    }
    match format {
        "json" => println!("{}", serde_json::Value::Array(states)),
        "table" => {
            println!(
                "{:<20} {:<10} {:<10} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &states {
                println!(
                    "{:<20} {:<10} {:<10} {:<40} {:<32} {}",
                    s["id"].as_str().unwrap_or_default(),
                    s["pid"].to_string(),
                    s["status"].as_str().unwrap_or_default(),
                    s["bundle"].as_str().unwrap_or_default(),
                    s["created"].as_str().unwrap_or_default(),
                    s["owner"].as_str().unwrap_or_default(),
                );
            }
        }
        other => return Err(CliError::Other(format!("invalid format option {other:?}"))),
    }
    Ok(())
}
