// Reference V1 resource server: Express + x402-express 1.x on network `base-sepolia`, priced in the
// local TestUSDC. The 402 challenge is a JSON body ({x402Version: 1, accepts}); browser-like requests
// (Accept: text/html + Mozilla UA) get an HTML paywall instead.
// Routes: GET /free, GET /paid/a, GET /paid/fail500, GET /__stats.
// Run: node tests/stack/server_express_v1.mjs --port P --facilitator URL --asset 0x.. --pay-to 0x.. [--price 1000]
import express from 'express'
import { paymentMiddleware } from 'x402-express'
import { createStats, readOptions, report } from './_common.mjs'

const opts = readOptions('base-sepolia')
const stats = createStats()

// V1 price object: atomic amount plus the token's address, decimals and EIP-712 domain.
const price = {
  amount: opts.price,
  asset: {
    address: opts.asset,
    decimals: 6,
    eip712: { name: opts.tokenName, version: opts.tokenVersion },
  },
}
const routeConfig = (description) => ({
  price,
  network: opts.network,
  config: { description, mimeType: 'application/json', maxTimeoutSeconds: opts.maxTimeout },
})

const app = express()
app.disable('x-powered-by')
app.use(
  paymentMiddleware(
    opts.payTo,
    {
      'GET /paid/a': routeConfig('paid resource A'),
      'GET /paid/fail500': routeConfig('paid resource whose handler fails'),
    },
    // Explicit loopback facilitator: the V1 default is the public x402.org facilitator.
    { url: opts.facilitator }
  )
)

app.get('/free', (req, res) => {
  stats.hit('/free')
  res.json(report(req))
})
app.get('/paid/a', (req, res) => {
  stats.hit('/paid/a')
  res.json(report(req, { resource: 'a' }))
})
app.get('/paid/fail500', (req, res) => {
  stats.hit('/paid/fail500')
  res.status(500).json({ ...report(req), ok: false, error: 'handler failed on purpose' })
})
app.get('/__stats', (req, res) => res.json({ handled: stats.handled }))

const server = app.listen(opts.port, opts.host, () => {
  console.log(`express-v1 listening on http://${opts.host}:${opts.port}`)
})
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)))
