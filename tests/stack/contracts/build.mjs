// Compiles the test contracts offline with the npm `solc` package (no compiler download) and writes
// one JSON artifact per contract next to this script: {contractName, abi, bytecode, deployedBytecode}.
// Run: node tests/stack/contracts/build.mjs
import { readFileSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const require = createRequire(import.meta.url)
const solc = require('solc')

const CONTRACTS = ['TestUSDC', 'LocalMulticall', 'BatchSettlement', 'ERC3009DepositCollector']

const sources = Object.fromEntries(
  CONTRACTS.map((name) => [`${name}.sol`, { content: readFileSync(join(here, `${name}.sol`), 'utf8') }])
)

const input = {
  language: 'Solidity',
  sources,
  settings: {
    // Pinned so the artifact does not change with solc's default and runs on anvil's default hardfork.
    evmVersion: 'cancun',
    optimizer: { enabled: true, runs: 200 },
    metadata: { bytecodeHash: 'none' },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
}

// Resolve `@openzeppelin/...` imports from this package's node_modules.
function findImports(path) {
  try {
    return { contents: readFileSync(require.resolve(path), 'utf8') }
  } catch (err) {
    return { error: `cannot resolve ${path}: ${err.message}` }
  }
}

const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }))
const errors = (output.errors ?? []).filter((e) => e.severity === 'error')
for (const e of output.errors ?? []) console.error(e.formattedMessage)
if (errors.length > 0) process.exit(1)

for (const name of CONTRACTS) {
  const c = output.contracts[`${name}.sol`][name]
  const artifact = {
    contractName: name,
    compiler: solc.version(),
    abi: c.abi,
    bytecode: `0x${c.evm.bytecode.object}`,
    deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
  }
  writeFileSync(join(here, `${name}.json`), `${JSON.stringify(artifact, null, 2)}\n`)
  console.log(`wrote ${name}.json (${c.evm.deployedBytecode.object.length / 2} bytes runtime)`)
}
