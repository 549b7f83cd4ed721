// Adds the other platforms' anvil binary packages to package-lock.json.
//
// Why: @foundry-rs/anvil ships its binary in per-platform optional dependencies. When the registry in
// use lacks some of them (the mirror on our build machines only has linux-amd64), `npm install`
// silently drops them from the lockfile, and `npm ci` then refuses the lockfile as out of sync
// ("Missing: @foundry-rs/anvil-darwin-arm64@ from lock file"). npm skips optional packages whose
// os/cpu do not match without fetching them, so entries carrying version + os + cpu are enough.
// Run after every `npm install` that rewrites the lockfile: node tests/stack/lock-platforms.mjs
import { readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const lockPath = join(dirname(fileURLToPath(import.meta.url)), 'package-lock.json')
const lock = JSON.parse(readFileSync(lockPath, 'utf8'))
const packages = lock.packages

const PLATFORMS = {
  'darwin-amd64': { os: 'darwin', cpu: 'x64' },
  'darwin-arm64': { os: 'darwin', cpu: 'arm64' },
  'linux-amd64': { os: 'linux', cpu: 'x64' },
  'linux-arm64': { os: 'linux', cpu: 'arm64' },
  'win32-amd64': { os: 'win32', cpu: 'x64' },
}

let added = 0
for (const [key, meta] of Object.entries(packages)) {
  const match = key.match(/^node_modules\/@foundry-rs\/([a-z]+)$/)
  if (!match || !meta.optionalDependencies) continue
  const tool = match[1]
  for (const [dep, version] of Object.entries(meta.optionalDependencies)) {
    const entryKey = `node_modules/${dep}`
    if (packages[entryKey]) continue
    const platform = PLATFORMS[dep.slice(`@foundry-rs/${tool}-`.length)]
    if (!platform) throw new Error(`unknown platform package ${dep}`)
    packages[entryKey] = {
      version,
      cpu: [platform.cpu],
      license: meta.license,
      optional: true,
      os: [platform.os],
      bin: { [tool]: platform.os === 'win32' ? `bin/${tool}.exe` : `bin/${tool}` },
      engines: { node: '>=20' },
    }
    added += 1
  }
}

// npm keeps `packages` sorted by path (localeCompare 'en'); keep diffs to the added entries.
lock.packages = Object.fromEntries(
  Object.entries(packages).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a.localeCompare(b, 'en')))
)
writeFileSync(lockPath, `${JSON.stringify(lock, null, 2)}\n`)
console.log(`package-lock.json: added ${added} platform entr${added === 1 ? 'y' : 'ies'}`)
