{{/*
Shared helpers. Everything a service needs is derived from two places: its values block (.Values.<service>) and the
static catalogue below, which records what the code fixes (topic names, who consumes and produces what, which ports
are public). Templates loop over the catalogue, so adding a service is one catalogue entry and one values block.
*/}}

{{/* The services, in pipeline order. */}}
{{- define "sightline.services" -}}
capture detection embedding matching decision
{{- end }}

{{/*
What the code fixes for each service. `consumes` is the input topic (the one KEDA measures lag on, with consumer group
sightline-<service>); `alsoConsumes` are the side inputs it reads in the same group, never scaled on (decision: the
kiosks' session events, and the right-to-erasure notices it applies); `produces` are the topics it writes; `public`
services take gRPC from outside clients; `grpcClients` are the services that call this one over gRPC; `callerRoles`
are the roles of the service's own principal (service:<name>) on its gRPC calls to others
(sightline.common.auth.SERVICE_CALLER_ROLES; empty: it calls no one and gets no token).
Topic keys are the keys of .Values.kafka.topics; the topic name is sightline.<key>.v1.
*/}}
{{- define "sightline.catalog" -}}
capture:
  consumes: ""
  alsoConsumes: []
  produces: [frames, sessions, deadletter]
  public: true
  grpcClients: []
  calls: [matching]
  callerRoles: [operator, enroller]
detection:
  consumes: frames
  alsoConsumes: []
  produces: [faces, deadletter]
  public: false
  grpcClients: [matching]
  calls: []
  callerRoles: []
embedding:
  consumes: faces
  alsoConsumes: []
  produces: [embeddings, deadletter]
  public: false
  grpcClients: [matching]
  calls: []
  callerRoles: []
matching:
  consumes: embeddings
  alsoConsumes: []
  produces: [matches, erasures, audit, deadletter]
  public: true
  grpcClients: [capture]
  calls: [detection, embedding]
  callerRoles: [operator]
decision:
  consumes: matches
  alsoConsumes: [sessions, erasures]
  produces: [decisions, alerts, sessions, audit, deadletter]
  public: true
  grpcClients: []
  calls: []
  callerRoles: []
{{- end }}

{{/* Topic keys (of .Values.kafka.topics) in pipeline order, for a readable hook topic list. */}}
{{- define "sightline.topicKeys" -}}
frames faces embeddings matches decisions alerts sessions erasures deadletter audit
{{- end }}

{{- define "sightline.topicName" -}}
sightline.{{ . }}.v1
{{- end }}

{{/*
Which retention limit (a key of .Values.retention) each topic takes when its kafka.topics.<key>.retentionMs is unset:
the data-class mapping of RetentionSettings.topic_retention_ms (services/common/retention.py). Dead letters may hold
frames or descriptors, so they take the raw limit. tests/deploy checks the rendered result against the code.
*/}}
{{- define "sightline.topicRetentionLimits" -}}
frames: rawHours
faces: rawHours
embeddings: rawHours
deadletter: rawHours
matches: matchesHours
sessions: sessionsHours
decisions: decisionsDays
alerts: alertsDays
audit: auditDays
erasures: auditDays
{{- end }}

{{/*
retention.ms of one topic: kafka.topics.<key>.retentionMs when set, else its limit from .Values.retention, computed
as the code does (hours * 3600000, days * 24 * 3600000, truncated). Call with (dict "root" $ "key" "frames").
*/}}
{{- define "sightline.topicRetentionMs" -}}
{{- $t := index .root.Values.kafka.topics .key }}
{{- if not (kindIs "invalid" $t.retentionMs) }}
{{- $t.retentionMs | int64 }}
{{- else }}
{{- $limit := index (include "sightline.topicRetentionLimits" .root | fromYaml) .key }}
{{- $amount := index .root.Values.retention $limit }}
{{- if hasSuffix "Days" $limit }}
{{- mulf (mulf $amount 24) 3600000 | int64 }}
{{- else }}
{{- mulf $amount 3600000 | int64 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Retention limits (SIGHTLINE_RETENTION_*, RetentionSettings), the same in every container: the decision service purges
its database with them, and `sightline topics ensure` without --from-file creates the topics with them.
*/}}
{{- define "sightline.retentionEnv" -}}
{{- $r := .Values.retention -}}
- name: SIGHTLINE_RETENTION_RAW_HOURS
  value: {{ $r.rawHours | quote }}
- name: SIGHTLINE_RETENTION_MATCHES_HOURS
  value: {{ $r.matchesHours | quote }}
- name: SIGHTLINE_RETENTION_SESSIONS_HOURS
  value: {{ $r.sessionsHours | quote }}
- name: SIGHTLINE_RETENTION_DECISIONS_DAYS
  value: {{ $r.decisionsDays | quote }}
- name: SIGHTLINE_RETENTION_ALERTS_DAYS
  value: {{ $r.alertsDays | quote }}
- name: SIGHTLINE_RETENTION_AUDIT_DAYS
  value: {{ $r.auditDays | quote }}
- name: SIGHTLINE_RETENTION_PURGE_INTERVAL_S
  value: {{ $r.purgeIntervalS | quote }}
{{- end }}

{{- define "sightline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-sightline, shortened so that "<fullname>-embedding" still fits the 63-character label limit. */}}
{{- define "sightline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of a per-service resource. Call with (dict "root" $ "service" "detection"). */}}
{{- define "sightline.serviceName" -}}
{{ include "sightline.fullname" .root }}-{{ .service }}
{{- end }}

{{/*
Gallery shards (matching.shards, SIGHTLINE_MATCHING_SHARDS). A service's instances: its shards' numbers separated by
spaces ("0 1 2") for matching with shards > 1, else "" (one instance, named and labelled as without shards). Range
over them with splitList " ". Call with (dict "root" $ "service" "matching").
*/}}
{{- define "sightline.shards" -}}
{{- $v := index .root.Values .service }}
{{- if and (eq .service "matching") (gt (int $v.shards) 1) }}
{{- range $i, $_ := until (int $v.shards) }}{{ if $i }} {{ end }}{{ $i }}{{ end }}
{{- end }}
{{- end }}

{{/* One instance's name: the service's, with "-<shard>" for a shard. Call with (dict "root" $ "service" S "shard" N). */}}
{{- define "sightline.instanceName" -}}
{{ include "sightline.serviceName" . }}{{ with .shard }}-{{ . }}{{ end }}
{{- end }}

{{/*
Selector labels of one instance: the component's, plus sightline/shard for a shard, so that each shard's Deployment,
Service, PodDisruptionBudget and autoscaler reach that shard's pods only. Call with (dict "root" $ "component" C
"shard" N); shard "" is the component as without shards.
*/}}
{{- define "sightline.instanceSelectorLabels" -}}
{{ include "sightline.selectorLabels" . }}
{{- with .shard }}
sightline/shard: {{ . | quote }}
{{- end }}
{{- end }}

{{/* All labels of one instance's resources. Call with (dict "root" $ "component" C "shard" N). */}}
{{- define "sightline.instanceLabels" -}}
{{ include "sightline.componentLabels" . }}
{{- with .shard }}
sightline/shard: {{ . | quote }}
{{- end }}
{{- end }}

{{/* SIGHTLINE_MATCHING_SHARD_ADDRESSES: every shard's own Service, in shard order, as a JSON list. */}}
{{- define "sightline.shardAddresses" -}}
{{- $root := . }}
{{- $addresses := list }}
{{- range $shard := splitList " " (include "sightline.shards" (dict "root" $root "service" "matching")) }}
{{- $name := include "sightline.instanceName" (dict "root" $root "service" "matching" "shard" $shard) }}
{{- $addresses = append $addresses (printf "%s:%v" $name $root.Values.matching.grpcPort) }}
{{- end }}
{{- toJson $addresses }}
{{- end }}

{{- define "sightline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "sightline.labels" -}}
helm.sh/chart: {{ include "sightline.chart" . }}
app.kubernetes.io/name: {{ include "sightline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sightline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component (a service, or "topics" for the hook). Services and Deployments select on exactly
these three, so each Service reaches its own pods and nothing else. Call with (dict "root" $ "component" "detection").
*/}}
{{- define "sightline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sightline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's resources: the common ones plus its selector labels. */}}
{{- define "sightline.componentLabels" -}}
{{ include "sightline.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Image reference. Call with (dict "root" $ "image" .Values.<x>.image). The tag falls back to image.tag, then to the
chart's appVersion; `latest` and empty tags are refused here as well as in the schema, because the
schema cannot see the fallback.
*/}}
{{- define "sightline.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion | toString }}
{{- if or (eq $tag "latest") (eq $tag "") }}
{{- fail (printf "image %s: tag %q is not allowed; pin a version" .image.repository $tag) }}
{{- end }}
{{- printf "%s%s:%s" .root.Values.image.registry .image.repository $tag }}
{{- end }}

{{- define "sightline.pullPolicy" -}}
{{- .image.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{- define "sightline.serviceAccountName" -}}
{{- $sa := .values.serviceAccount }}
{{- if $sa.create }}
{{- default (include "sightline.serviceName" (dict "root" .root "service" .service)) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/* Names of the Secrets the chart may create, and the Secret/key each value is read from. */}}
{{- define "sightline.kafkaSecretName" -}}
{{- .Values.kafka.sasl.existingSecret | default (printf "%s-kafka" (include "sightline.fullname" .)) }}
{{- end }}

{{- define "sightline.databaseSecretName" -}}
{{- .Values.matching.database.postgresql.existingSecret | default (printf "%s-database" (include "sightline.fullname" .)) }}
{{- end }}

{{- define "sightline.templateKeySecretName" -}}
{{- .Values.matching.templateKey.existingSecret | default (printf "%s-template-key" (include "sightline.fullname" .)) }}
{{- end }}

{{- define "sightline.captureSourcesSecretName" -}}
{{- .Values.capture.sources.existingSecret | default (printf "%s-capture-sources" (include "sightline.fullname" .)) }}
{{- end }}

{{- define "sightline.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "sightline.fullname" .)) }}
{{- end }}

{{/*
The SQLite volume of a service in SQLite mode (matching.database.mode=sqlite): matching's gallery and audit chain,
decision's alerts under review, reviews, sessions and audit chain. Each is its own PVC mounted at /var/lib/sightline
in its own pod: two pods cannot share a SQLite file, and a ReadWriteOnce volume allows one pod (hence one replica, see
sightline.validate). Renders YAML (volume name, claim name, the PVC's values block as `settings`), or nothing when the
service keeps no SQLite volume (disabled, a stateless service, or PostgreSQL mode); read it with fromYaml. The claim
names must never change: an upgrade would start on an empty volume. Call with (dict "root" $ "service" "decision").
*/}}
{{- define "sightline.sqliteStore" -}}
{{- $root := .root }}
{{- if and (has .service (list "matching" "decision")) (index $root.Values .service).enabled (eq $root.Values.matching.database.mode "sqlite") }}
{{- $isMatching := eq .service "matching" }}
{{- $volume := ternary "gallery" "data" $isMatching }}
{{- $settings := ternary $root.Values.matching.database.sqlite $root.Values.decision.sqlite $isMatching }}
volume: {{ $volume }}
claimName: {{ $settings.existingClaim | default (printf "%s-%s" (include "sightline.serviceName" (dict "root" $root "service" .service)) $volume) }}
settings: {{ toJson $settings }}
{{- end }}
{{- end }}

{{/*
The audit chain (SIGHTLINE_AUDIT_DATABASE_URL, AuditSettings). With PostgreSQL every service reads the gallery's
database from the same Secret and key, so the release has one chain: matching's and decision's records, and every
service's refused calls. With SQLite two pods cannot share a file: matching and decision each keep their own chain on
their own PVC (sightline.sqliteStore), so there are two separate chains (the file names differ too, so that even a
claim shared through existingClaim never holds one file for two writers), and capture, detection and embedding get
no URL: they log their refused calls but do not audit them. Renders nothing for those.
Every service given a URL also gets the audit keyring from its Secret (sightline.auditKeysEnv).
Call with (dict "root" $ "service" "matching").
*/}}
{{- define "sightline.auditEnv" -}}
{{- $db := .root.Values.matching.database -}}
{{- if eq $db.mode "postgresql" }}
- name: SIGHTLINE_AUDIT_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sightline.databaseSecretName" .root }}
      key: {{ $db.postgresql.existingSecretKey }}
{{- include "sightline.auditKeysEnv" .root }}
{{- else if eq .service "matching" }}
- name: SIGHTLINE_AUDIT_DATABASE_URL
  value: sqlite:////var/lib/sightline/audit.db
{{- include "sightline.auditKeysEnv" .root }}
{{- else if eq .service "decision" }}
- name: SIGHTLINE_AUDIT_DATABASE_URL
  value: sqlite:////var/lib/sightline/decision-audit.db
{{- include "sightline.auditKeysEnv" .root }}
{{- end }}
{{- end }}

{{/*
The audit keyring and checkpoint schedule of a service that writes audit records (common/audit_keys.py,
common/audit_checkpoints.py). SIGHTLINE_AUDIT_REQUIRE_KEYS: a pod without its keyring refuses to start rather than
make a key of its own on its volume, which no auditor would have.
*/}}
{{- define "sightline.auditKeysEnv" -}}
{{- $a := .Values.audit }}
- name: SIGHTLINE_AUDIT_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "sightline.auditKeysSecretName" . }}
      key: {{ $a.keys.existingSecretKey }}
{{- with $a.keys.activeKeyId }}
- name: SIGHTLINE_AUDIT_KEY_ID
  value: {{ . | quote }}
{{- end }}
- name: SIGHTLINE_AUDIT_REQUIRE_KEYS
  value: "true"
- name: SIGHTLINE_AUDIT_CHECKPOINT_EVERY
  value: {{ $a.checkpointEvery | quote }}
- name: SIGHTLINE_AUDIT_CHECKPOINT_INTERVAL_S
  value: {{ $a.checkpointIntervalS | quote }}
{{- if $a.legacyUntil }}
- name: SIGHTLINE_AUDIT_LEGACY_UNTIL
  value: {{ $a.legacyUntil | quote }}
{{- end }}
{{- end }}

{{- define "sightline.auditKeysSecretName" -}}
{{- .Values.audit.keys.existingSecret | default (printf "%s-audit-keys" (include "sightline.fullname" .)) }}
{{- end }}

{{- define "sightline.captureHasSources" -}}
{{- if and .Values.capture.enabled (or .Values.capture.sources.uris .Values.capture.sources.existingSecret) }}true{{ end }}
{{- end }}

{{- define "sightline.kafkaUsesSasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "sightline.kafkaUsesTls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{- define "sightline.kafkaHasCa" -}}
{{- if and (include "sightline.kafkaUsesTls" .) (or .Values.kafka.tls.ca.secretName .Values.kafka.tls.ca.configMapName) }}true{{ end }}
{{- end }}

{{/*
The Kafka connection, injected into every service and the hook from this one place so they can never disagree.
The SASL credentials are read from a Secret; the CA bundle is a mounted file (see sightline.kafkaCaVolume).
Call with (dict "root" $) for the services, or (dict "root" $ "secretName" NAME) to read the credentials from another
Secret (the hook does: at pre-install time the release's own Secrets do not exist yet).
*/}}
{{- define "sightline.kafkaEnv" -}}
{{- $root := .root }}
{{- $secret := .secretName | default (include "sightline.kafkaSecretName" $root) -}}
- name: SIGHTLINE_KAFKA_BOOTSTRAP_SERVERS
  value: {{ $root.Values.kafka.bootstrapServers | quote }}
- name: SIGHTLINE_KAFKA_SECURITY_PROTOCOL
  value: {{ $root.Values.kafka.securityProtocol | quote }}
- name: SIGHTLINE_KAFKA_DEFAULT_PARTITIONS
  value: {{ $root.Values.kafka.defaultPartitions | quote }}
- name: SIGHTLINE_KAFKA_REPLICATION_FACTOR
  value: {{ $root.Values.kafka.replicationFactor | quote }}
{{- if include "sightline.kafkaUsesSasl" $root }}
- name: SIGHTLINE_KAFKA_SASL_MECHANISM
  value: {{ $root.Values.kafka.sasl.mechanism | quote }}
- name: SIGHTLINE_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $root.Values.kafka.sasl.usernameKey }}
- name: SIGHTLINE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $root.Values.kafka.sasl.passwordKey }}
{{- end }}
{{- if include "sightline.kafkaHasCa" $root }}
- name: SIGHTLINE_KAFKA_SSL_CAFILE
  value: /etc/sightline/kafka-ca/ca.crt
{{- end }}
{{- end }}

{{- define "sightline.kafkaCaVolume" -}}
{{- if include "sightline.kafkaHasCa" . }}
- name: kafka-ca
  {{- if .Values.kafka.tls.ca.secretName }}
  secret:
    secretName: {{ .Values.kafka.tls.ca.secretName }}
    items:
      - key: {{ .Values.kafka.tls.ca.key }}
        path: ca.crt
  {{- else }}
  configMap:
    name: {{ .Values.kafka.tls.ca.configMapName }}
    items:
      - key: {{ .Values.kafka.tls.ca.key }}
        path: ca.crt
  {{- end }}
{{- end }}
{{- end }}

{{- define "sightline.kafkaCaMount" -}}
{{- if include "sightline.kafkaHasCa" . }}
- name: kafka-ca
  mountPath: /etc/sightline/kafka-ca
  readOnly: true
{{- end }}
{{- end }}

{{/*
Access control and TLS of a service's gRPC server and of its calls (docs/security.md), from the auth and tls values.
The tokens file is a mounted file, so a changed Secret reaches running pods (the services re-read it); a service that
calls others also gets its own token. Without TLS that token would travel in clear text, which the code refuses to
anything but loopback: such a service is told the cluster network is trusted (SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS),
and NOTES.txt warns. Call the env helper with (dict "root" $ "service" "matching").
*/}}
{{- define "sightline.accessEnv" -}}
{{- $root := .root }}
{{- $c := index (include "sightline.catalog" $root | fromYaml) .service }}
{{- if $root.Values.auth.enabled }}
- name: SIGHTLINE_AUTH_TOKENS_FILE
  value: /etc/sightline/auth/tokens.yaml
{{- if $c.callerRoles }}
- name: SIGHTLINE_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "sightline.authSecretName" $root }}
      key: {{ .service }}-token
{{- if not $root.Values.tls.enabled }}
- name: SIGHTLINE_TLS_ALLOW_PLAINTEXT_TOKENS
  value: "true"
{{- end }}
{{- end }}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: SIGHTLINE_TLS_SERVER_CERT_FILE
  value: /etc/sightline/tls/tls.crt
- name: SIGHTLINE_TLS_SERVER_KEY_FILE
  value: /etc/sightline/tls/tls.key
- name: SIGHTLINE_TLS_CA_FILE
  value: /etc/sightline/tls/ca.crt
{{- if $root.Values.tls.requireClientCert }}
- name: SIGHTLINE_TLS_CLIENT_CA_FILE
  value: /etc/sightline/tls/ca.crt
- name: SIGHTLINE_TLS_CLIENT_CERT_FILE
  value: /etc/sightline/tls/tls.crt
- name: SIGHTLINE_TLS_CLIENT_KEY_FILE
  value: /etc/sightline/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{- define "sightline.accessVolumes" -}}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "sightline.authSecretName" . }}
    items:
      - key: {{ .Values.auth.tokensFileKey }}
        path: tokens.yaml
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}

{{- define "sightline.accessMounts" -}}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /etc/sightline/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/sightline/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
A probe's handler: the kubelet's own gRPC health probe, or, with TLS (which kubelet gRPC probes cannot speak), the
image's health check run inside the container with the service's own TLS settings. Call with (dict "root" $ "port" N).
*/}}
{{- define "sightline.probeHandler" -}}
{{- if .root.Values.tls.enabled }}
exec:
  command: ["python", "-m", "sightline.common.healthcheck", "{{ .port }}"{{ with .service }}, {{ . | quote }}{{ end }}]
{{- else }}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The only writable path in a container. */}}
{{- define "sightline.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
    {{- with .Values.tmpVolume.medium }}
    medium: {{ . }}
    {{- end }}
{{- end }}

{{/*
Checks that combine several values, which the JSON schema cannot express. They fail the render with a message that
names the value to change.
*/}}
{{- define "sightline.validate" -}}
{{- if and (include "sightline.kafkaUsesSasl" .) (not .Values.kafka.sasl.existingSecret) (or (not .Values.kafka.sasl.username) (not .Values.kafka.sasl.password)) }}
{{- fail "kafka.securityProtocol is SASL_*: set kafka.sasl.existingSecret, or kafka.sasl.username and kafka.sasl.password" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled: set tls.secretName to a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" }}
{{- end }}
{{- if and .Values.kafka.tls.ca.secretName .Values.kafka.tls.ca.configMapName }}
{{- fail "set only one of kafka.tls.ca.secretName and kafka.tls.ca.configMapName" }}
{{- end }}
{{- if .Values.capture.autoscaling.enabled }}
{{- if ne .Values.capture.autoscaling.mode "cpu" }}
{{- fail "capture.autoscaling.mode must be cpu: capture has no input topic to measure consumer lag on" }}
{{- end }}
{{- end }}
{{- $m := .Values.matching }}
{{- if and $m.enabled (eq $m.database.mode "sqlite") }}
{{- if $m.autoscaling.enabled }}
{{- fail "matching.autoscaling.enabled needs matching.database.mode=postgresql: the SQLite gallery allows exactly one matching replica" }}
{{- end }}
{{- if gt (int $m.replicas) 1 }}
{{- fail "matching.replicas > 1 needs matching.database.mode=postgresql: the SQLite gallery allows exactly one matching replica" }}
{{- end }}
{{- end }}
{{- $d := .Values.decision }}
{{- if and $d.enabled (eq $m.database.mode "sqlite") }}
{{- if $d.autoscaling.enabled }}
{{- fail "decision.autoscaling.enabled needs matching.database.mode=postgresql: in SQLite mode decision keeps its database on a ReadWriteOnce volume, which allows exactly one decision replica" }}
{{- end }}
{{- if gt (int $d.replicas) 1 }}
{{- fail "decision.replicas > 1 needs matching.database.mode=postgresql: in SQLite mode decision keeps its database on a ReadWriteOnce volume, which allows exactly one decision replica" }}
{{- end }}
{{- end }}
{{- if and $m.enabled (gt (int $m.shards) 1) (eq $m.database.mode "sqlite") }}
{{- fail "matching.shards > 1 needs matching.database.mode=postgresql: every shard's replicas read and write the one gallery database, and the SQLite gallery is a file on one pod's volume" }}
{{- end }}
{{- if and $m.enabled (eq $m.database.mode "postgresql") (not $m.database.postgresql.existingSecret) (not $m.database.postgresql.dsn) }}
{{- fail "matching.database.mode=postgresql: set matching.database.postgresql.existingSecret or matching.database.postgresql.dsn" }}
{{- end }}
{{- range $svc := splitList " " (include "sightline.services" .) }}
{{- $a := (index $.Values $svc).autoscaling }}
{{- if and $a.enabled (lt (int $a.maxReplicas) (int $a.minReplicas)) }}
{{- fail (printf "%s.autoscaling.maxReplicas must be >= minReplicas" $svc) }}
{{- end }}
{{- end }}
{{- end }}

{{/* NetworkPolicy egress rules shared by every pod: DNS, and the Kafka brokers. */}}
{{- define "sightline.dnsEgress" -}}
# DNS.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "sightline.kafkaEgress" -}}
# Kafka brokers.
- ports:
    {{- range .Values.networkPolicy.kafka.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.kafka.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
