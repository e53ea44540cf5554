//! `deploy/alerts/rules.toml`, the rules the Docker stack and the Kubernetes worker load, is a
//! valid rule file with the one rule the stack promises: temperature above 80.0 raises a
//! warning for every device, below 75.0 clears it.

use deploy_check::read;
use telemetry_alerts::RuleSet;

#[test]
fn the_stack_rules_parse_and_say_what_the_readme_promises() {
    let text = read("deploy/alerts/rules.toml").unwrap();
    RuleSet::from_toml(&text)
        .unwrap_or_else(|e| panic!("deploy/alerts/rules.toml is not a valid rule file: {e}"));
    let table: toml::Table = text.parse().unwrap();
    let rules = table["rule"].as_array().expect("[[rule]] tables");
    assert_eq!(rules.len(), 1);
    let rule = rules[0].as_table().unwrap();
    assert_eq!(rule["reading"].as_str(), Some("/temperature"));
    assert_eq!(rule["op"].as_str(), Some(">"));
    assert_eq!(rule["value"].as_float(), Some(80.0));
    assert_eq!(rule["clear"].as_float(), Some(75.0));
    assert_eq!(rule["severity"].as_str(), Some("warning"));
    assert!(
        !rule.contains_key("user") && !rule.contains_key("device"),
        "the rule applies to every device"
    );
}
