//! `cocoon gc`: collects the layer cache now (what `create` does at most once an hour; see
//! `cocoon_runtime::layer_cache`).

use std::time::{Duration, SystemTime};

use cocoon_runtime::config::Config;
use cocoon_runtime::layer_cache;

use crate::error::CliError;

pub fn gc(max_age_hours: Option<u64>) -> Result<(), CliError> {
    let config = Config::load()?;
    let max_age = max_age_hours.map_or(config.layer_cache_max_age(), |hours| {
        Duration::from_secs(hours.saturating_mul(3600))
    });
    let done = layer_cache::collect(&config.layer_cache, max_age, SystemTime::now())?;
    println!(
        "removed {} layer images ({} MiB); kept {} in use and {} used within {}h; swept {} temporaries",
        done.removed.len(),
        done.removed_bytes.div_ceil(1 << 20),
        done.in_use,
        done.recent,
        max_age.as_secs() / 3600,
        done.temporaries
    );
    Ok(())
}
