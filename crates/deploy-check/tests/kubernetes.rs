//! `deploy/k8s`: every manifest validates against the Kubernetes 1.33 schema of its kind (or
//! KEDA's, for the ScaledObject), strict about unknown fields, and the workloads are wired
//! the way the guide says: probes on the health endpoints, limits, a disruption budget, lag-based
//! autoscaling on the worker's own consumer group, and configs the binaries accept.

use std::collections::BTreeMap;

use deploy_check::{load_stage_config, read, repo_root, yaml, yaml_documents};
use serde_json::Value;
use telemetry_bridge::BridgeConfig;
use telemetry_worker::WorkerConfig;

const KUBERNETES_SCHEMAS: &str = "crates/deploy-check/schemas/kubernetes-v1.33";
const KEDA_SCHEMAS: &str = "crates/deploy-check/schemas/keda";
/// Where the vendored definitions say they live (their `$id`); kinds refer to them from there.
const DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";

/// Every object of every manifest file, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let dir = repo_root().join("deploy/k8s");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|file| {
            let path = format!("deploy/k8s/{file}");
            yaml_documents(&path, &read(&path).unwrap())
                .unwrap()
                .into_iter()
                .map(move |doc| (file.clone(), doc))
        })
        .collect()
}

fn find<'a>(manifests: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    manifests
        .iter()
        .map(|(_, m)| m)
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/k8s"))
}

fn schema_file(api_version: &str, kind: &str) -> String {
    let kind = kind.to_ascii_lowercase();
    match api_version.split_once('/') {
        Some(("keda.sh", version)) => format!("{KEDA_SCHEMAS}/{kind}-keda-{version}.json"),
        Some((group, version)) => format!("{KUBERNETES_SCHEMAS}/{kind}-{group}-{version}.json"),
        None => format!("{KUBERNETES_SCHEMAS}/{kind}-{api_version}.json"),
    }
}

#[test]
fn every_manifest_validates_against_the_schema_of_its_kind() {
    let definitions =
        deploy_check::json(&format!("{KUBERNETES_SCHEMAS}/_definitions.json")).unwrap();
    let registry = jsonschema::Registry::new()
        .add(
            DEFINITIONS_URI,
            jsonschema::Resource::from_contents(definitions),
        )
        .unwrap()
        .prepare()
        .unwrap();
    let manifests = manifests();
    assert!(
        manifests.len() >= 10,
        "expected the worker and bridge manifests"
    );
    let mut failures = Vec::new();
    for (file, manifest) in &manifests {
        let api_version = manifest["apiVersion"].as_str().expect("apiVersion");
        let kind = manifest["kind"].as_str().expect("kind");
        let name = manifest["metadata"]["name"].as_str().unwrap_or("?");
        let path = schema_file(api_version, kind);
        let schema = deploy_check::json(&path).unwrap_or_else(|e| {
            panic!("{file}: no vendored schema for {api_version} {kind} ({e}); vendor it (schemas/SOURCES.md)")
        });
        let validator = jsonschema::options()
            .with_registry(&registry)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{path} is not a usable schema: {e}"));
        for error in validator.iter_errors(manifest) {
            failures.push(format!(
                "{file}: {kind} {name}: at {}: {error}",
                error.instance_path()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_schemas_catch_a_misspelt_field() {
    // Proof that validation is strict: the worker's Deployment with one field misspelt fails.
    let definitions =
        deploy_check::json(&format!("{KUBERNETES_SCHEMAS}/_definitions.json")).unwrap();
    let registry = jsonschema::Registry::new()
        .add(
            DEFINITIONS_URI,
            jsonschema::Resource::from_contents(definitions),
        )
        .unwrap()
        .prepare()
        .unwrap();
    let schema = deploy_check::json(&schema_file("apps/v1", "Deployment")).unwrap();
    let validator = jsonschema::options()
        .with_registry(&registry)
        .build(&schema)
        .unwrap();
    let manifests = manifests();
    let mut deployment = find(&manifests, "Deployment", "telemetry-worker").clone();
    assert!(validator.is_valid(&deployment));
    let container = &mut deployment["spec"]["template"]["spec"]["containers"][0];
    container["readinesProbe"] = container["readinessProbe"].take();
    container.as_object_mut().unwrap().remove("readinessProbe");
    assert!(!validator.is_valid(&deployment));
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let kustomization = yaml("deploy/k8s/kustomization.yaml").unwrap();
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, files);
}

fn workloads(manifests: &[(String, Value)]) -> Vec<&Value> {
    manifests
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m["kind"] == "Deployment" || m["kind"] == "StatefulSet")
        .collect()
}

#[test]
fn every_workload_has_health_probes_limits_and_a_disruption_budget() {
    let manifests = manifests();
    let workloads = workloads(&manifests);
    assert_eq!(workloads.len(), 2, "the worker and the bridge");
    for workload in workloads {
        let name = workload["metadata"]["name"].as_str().unwrap();
        let pod = &workload["spec"]["template"];
        assert_eq!(
            pod["spec"]["securityContext"]["runAsNonRoot"], true,
            "{name}"
        );
        for container in pod["spec"]["containers"].as_array().unwrap() {
            assert_eq!(
                container["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{name}: liveness on /healthz"
            );
            assert_eq!(
                container["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{name}: readiness on /readyz"
            );
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"]["limits"][resource].is_string(),
                    "{name}: no {resource} limit"
                );
                assert!(
                    container["resources"]["requests"][resource].is_string(),
                    "{name}: no {resource} request"
                );
            }
        }
        let labels = pod["metadata"]["labels"].as_object().unwrap();
        let budget = manifests
            .iter()
            .map(|(_, m)| m)
            .find(|m| {
                m["kind"] == "PodDisruptionBudget"
                    && m["spec"]["selector"]["matchLabels"]
                        .as_object()
                        .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
            .unwrap_or_else(|| panic!("no PodDisruptionBudget selects {name}'s pods"));
        assert_eq!(
            budget["metadata"]["namespace"],
            workload["metadata"]["namespace"]
        );
    }
}

/// The variables Kubernetes puts into every pod of a namespace for each of its Services with a
/// cluster IP, unless the pod sets `enableServiceLinks: false`: `{NAME}_SERVICE_HOST`,
/// `{NAME}_PORT`, `{NAME}_PORT_{port}_TCP_ADDR` and the like, the name upper-cased with `-` as
/// `_`. A Service called `telemetry-worker` thus makes `TELEMETRY_WORKER_SERVICE_HOST`.
fn service_link_env(manifests: &[(String, Value)], namespace: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let services = manifests.iter().map(|(_, m)| m).filter(|m| {
        m["kind"] == "Service"
            && m["metadata"]["namespace"] == *namespace
            && m["spec"]["clusterIP"] != "None"
    });
    for service in services {
        let name = service["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_ascii_uppercase()
            .replace('-', "_");
        let ip = "10.96.0.10";
        for (i, port) in service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let number = port["port"].as_u64().unwrap();
            let proto = port["protocol"].as_str().unwrap_or("TCP");
            let url = format!("{}://{ip}:{number}", proto.to_ascii_lowercase());
            if i == 0 {
                env.insert(format!("{name}_SERVICE_HOST"), ip.to_owned());
                env.insert(format!("{name}_SERVICE_PORT"), number.to_string());
                env.insert(format!("{name}_PORT"), url.clone());
            }
            if let Some(port_name) = port["name"].as_str() {
                let port_name = port_name.to_ascii_uppercase().replace('-', "_");
                env.insert(
                    format!("{name}_SERVICE_PORT_{port_name}"),
                    number.to_string(),
                );
            }
            let prefix = format!("{name}_PORT_{number}_{proto}");
            env.insert(format!("{prefix}_PROTO"), proto.to_ascii_lowercase());
            env.insert(format!("{prefix}_PORT"), number.to_string());
            env.insert(format!("{prefix}_ADDR"), ip.to_owned());
            env.insert(prefix, url);
        }
    }
    env
}

/// The environment a container of `workload` would get: the service links Kubernetes adds
/// (see [`service_link_env`]), plain values, Secret values (from the manifests' own Secrets)
/// and pod fields (a stand-in pod name).
fn container_env(manifests: &[(String, Value)], workload: &Value) -> BTreeMap<String, String> {
    let pod = &workload["spec"]["template"]["spec"];
    let mut env = if pod["enableServiceLinks"] == false {
        BTreeMap::new()
    } else {
        service_link_env(manifests, &workload["metadata"]["namespace"])
    };
    env.extend(container_env_vars(manifests, &pod["containers"][0]));
    env
}

fn container_env_vars(
    manifests: &[(String, Value)],
    container: &Value,
) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_owned();
            let value = if let Some(value) = var["value"].as_str() {
                value.to_owned()
            } else if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_object() {
                let manifest = find(manifests, "Secret", secret["name"].as_str().unwrap());
                let key = secret["key"].as_str().unwrap();
                manifest["stringData"][key]
                    .as_str()
                    .unwrap_or_else(|| panic!("Secret {} has no key {key}", secret["name"]))
                    .to_owned()
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                "telemetry-bridge-0".to_owned()
            } else {
                panic!("unhandled env source in {var}")
            };
            (name, value)
        })
        .collect()
}

/// The TOML file a container reads (`{PREFIX}CONFIG` names a file in a mounted ConfigMap).
fn mounted_config(
    manifests: &[(String, Value)],
    workload: &Value,
    env: &BTreeMap<String, String>,
    variable: &str,
) -> String {
    let path = env
        .get(variable)
        .unwrap_or_else(|| panic!("{variable} is not set"));
    let (dir, file) = path.rsplit_once('/').unwrap();
    let pod = &workload["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let config_map = find(
        manifests,
        "ConfigMap",
        volume["configMap"]["name"].as_str().unwrap(),
    );
    config_map["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no {file}"))
        .to_owned()
}

#[test]
fn the_worker_manifests_give_a_valid_worker_config() {
    let manifests = manifests();
    let deployment = find(&manifests, "Deployment", "telemetry-worker");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = container_env(&manifests, deployment);
    let toml = mounted_config(&manifests, deployment, &env, "TELEMETRY_WORKER_CONFIG");
    let config: WorkerConfig = load_stage_config(
        "deploy/k8s/worker.yaml",
        Some(&toml),
        &env,
        "TELEMETRY_WORKER_",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.kafka.topic, telemetry_core::contract::DEFAULT_TOPIC);
    // One prefix for every pod: a partition's alert session must be the same whichever pod
    // holds the partition.
    assert_eq!(config.alerts.outbox.mqtt.client_id, "telemetry-alerts");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(u64::from(config.http.listen.port()), port);

    // The alert rules in the ConfigMap are the repository's rules file.
    let config_map = find(&manifests, "ConfigMap", "telemetry-worker");
    assert_eq!(
        config_map["data"]["rules.toml"].as_str().unwrap().trim(),
        read("deploy/alerts/rules.toml").unwrap().trim(),
        "deploy/k8s/worker.yaml's rules.toml differs from deploy/alerts/rules.toml"
    );

    // KEDA scales on this worker's own consumer group and topic, up to one replica per
    // partition.
    let scaled = find(&manifests, "ScaledObject", "telemetry-worker");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "telemetry-worker");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["kind"], "Deployment");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    assert_eq!(
        trigger["metadata"]["consumerGroup"],
        config.group_id.as_str()
    );
    assert_eq!(trigger["metadata"]["topic"], config.kafka.topic.as_str());
    assert_eq!(
        trigger["metadata"]["bootstrapServers"],
        config.kafka.brokers.as_str()
    );
    assert_eq!(
        scaled["spec"]["maxReplicaCount"], 12,
        "no more worker replicas than iot-stream has partitions (redpanda/topics.conf)"
    );
}

#[test]
fn the_bridge_manifests_give_a_valid_bridge_config_with_a_stable_client_id() {
    let manifests = manifests();
    let stateful_set = find(&manifests, "StatefulSet", "telemetry-bridge");
    let container = &stateful_set["spec"]["template"]["spec"]["containers"][0];
    let env = container_env(&manifests, stateful_set);
    let toml = mounted_config(&manifests, stateful_set, &env, "TELEMETRY_BRIDGE_CONFIG");
    let config: BridgeConfig = load_stage_config(
        "deploy/k8s/bridge.yaml",
        Some(&toml),
        &env,
        "TELEMETRY_BRIDGE_",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mqtt.client_id, "telemetry-bridge-0", "the pod name");
    assert!(config.mqtt.shared_group.is_some());
    assert!(config.mqtt.password.is_some());
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(u64::from(config.http.listen.port()), port);
}
