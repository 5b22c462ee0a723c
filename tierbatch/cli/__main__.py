from tierbatch.cli.main import main

main()
