// Validates an AsyncAPI document with the AsyncAPI parser and its Protocol Buffers schema parser (every payload of
// protos/asyncapi.yaml is a proto schema, converted and checked by it). Installed beside its node_modules by
// `make tools` (build/tools/contract); run by tests/unit/test_asyncapi.py:
//
//   node build/tools/contract/validate-asyncapi.mjs protos/asyncapi.yaml
//
// Prints one JSON object: the diagnostics by severity and what the parsed document holds (channels, messages and
// operations with their ids), so that the caller can check it against the topic catalogue. Exit 0 when the
// document has no error, 1 when it has, 2 when it cannot be read.
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";
import { ProtoBuffSchemaParser } from "@asyncapi/protobuf-schema-parser";

const SEVERITY = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "information",
  [DiagnosticSeverity.Hint]: "hint",
};

async function main(path) {
  const text = await readFile(path, "utf8");
  const parser = new Parser();
  parser.registerSchemaParser(ProtoBuffSchemaParser());
  const { document, diagnostics } = await parser.parse(text, { source: path });
  const report = { error: [], warning: [], information: [], hint: [] };
  for (const item of diagnostics) {
    report[SEVERITY[item.severity]].push({ code: String(item.code), path: item.path.join("/"), message: item.message });
  }
  if (document) {
    report.channels = Object.fromEntries(
      document.channels().all().map((channel) => [
        channel.id(),
        { address: channel.address(), messages: channel.messages().all().map((message) => message.id()) },
      ]),
    );
    report.operations = document.operations().all().map((operation) => ({
      id: operation.id(),
      action: operation.action(),
      channels: operation.channels().all().map((channel) => channel.id()),
    }));
    // The converted payload of each message: its title and properties show the proto schema was understood.
    report.payloads = Object.fromEntries(
      document.components().messages().all().map((message) => {
        const payload = message.payload();
        return [message.id(), payload ? { title: payload.title(), properties: Object.keys(payload.properties() || {}) } : null];
      }),
    );
  }
  process.stdout.write(JSON.stringify(report) + "\n");
  return report.error.length ? 1 : 0;
}

main(process.argv[2]).then(
  (code) => process.exit(code),
  (error) => {
    process.stderr.write(`cannot validate ${process.argv[2]}: ${error.stack || error}\n`);
    process.exit(2);
  },
);
