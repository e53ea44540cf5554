//! Any text as the alert rules file: loading it never panics, and a file that loads has rules
//! that can be asked for any device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry_alerts::rules::RuleSet;
use telemetry_core::contract::DeviceId;

fuzz_target!(|text: &str| {
    if let Ok(rules) = RuleSet::from_toml(text) {
        let device = DeviceId::new("fuzz-user", "fuzz-device").unwrap();
        let _ = rules.for_device(&device);
    }
});
